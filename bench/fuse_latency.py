"""Fused vs train-form eval latency on this CPU (median of N after warm-up), batch 1.

    python bench/fuse_latency.py --model repvgg_a0 --image-size 224 --runs 20
"""

import argparse
import json

import torch

from repq.engines.fuse_check import check_fuse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="repvgg_a0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(check_fuse(args.model, 1000, args.image_size, None, args.runs), indent=2))


if __name__ == "__main__":
    main()
