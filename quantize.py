"""Quantize a model (min-max RTN or GPTQ) and save it as a checkpoint of this project:

    python quantize.py --model PATH --bits 4 --group-size 32 --quant gptq --calib FILE --out DIR

PATH is an HF LLaMA directory, a GGUF file or a checkpoint (default: the embedded SmolLM2); the
checkpoint in DIR loads with Transformer.from_pretrained, and trains with train.py --quant native.
"""
import json
import os
import time

import torch

import data
from cli import ArgumentParser, UserError, embedded_model_path, run_cli
from model import Transformer
from quant import BITS, check_bits_group, quantize_model
from tokenizer import load_tokenizer


def main(argv=None):
    p = ArgumentParser(description="Quantize a model (min-max RTN or GPTQ) and save a quantized checkpoint.")
    p.add_argument("--model", default=None, help="HF dir, .gguf, or checkpoint dir (default: embedded SmolLM2)")
    p.add_argument("--bits", type=int, default=4, choices=BITS)
    p.add_argument("--group-size", type=int, default=32, help="columns per group; -1 = whole rows")
    p.add_argument("--quant", default="rtn", choices=["rtn", "gptq"])
    p.add_argument("--calib", default=None, help="calibration text file (gptq)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--act-order", action="store_true", help="gptq act-order (implies --static-groups)")
    p.add_argument("--static-groups", action="store_true", help="gptq: group parameters fixed before the sweep")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)

    check_bits_group(args.bits, args.group_size)
    path = args.model or embedded_model_path()
    if os.path.exists(args.out) and os.listdir(args.out) and not args.overwrite:
        raise UserError(f"--out {args.out} exists and is not empty; pass --overwrite or choose another directory")
    calib = None
    if args.quant == "gptq":
        if args.calib is None:
            raise UserError("--quant gptq needs --calib FILE (a text file to calibrate on)")
        if args.nsamples < 1 or args.seq_len < 1:
            raise UserError(f"--nsamples {args.nsamples} and --seq-len {args.seq_len} must be at least 1")
        tok = load_tokenizer(path)
        calib = data.calibration_windows(tok, args.calib, n=args.nsamples, seq_len=args.seq_len, seed=args.seed)
    torch.manual_seed(args.seed)
    model = Transformer.from_pretrained(path)
    t0 = time.time()
    quantize_model(model, args.bits, args.group_size, method=args.quant, calib=calib, batch_size=args.batch_size,
                   **({"damp": args.damp, "block_size": args.block_size, "act_order": args.act_order,
                       "static_groups": args.static_groups or args.act_order} if args.quant == "gptq" else {}))
    seconds = time.time() - t0
    model.save_pretrained(args.out, tokenizer=load_tokenizer(path, optional=True))  # the tokenizer, when it has one
    print(json.dumps({"out": args.out, "bits": args.bits, "group_size": args.group_size, "method": args.quant,
                      "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    run_cli(main)
