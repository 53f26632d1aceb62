"""Quality of the low-bit path: perplexity against the dequantized float32 path, same model.

    python benchmarks/bench_quality.py [--model smollm2-135m-instruct] [--quantize auto,int8]
    python benchmarks/bench_quality.py --model out.gguf --reference MODEL --quantize auto

The second form measures a file `sorai quantize MODEL ... -o out.gguf` wrote against the model it
came from (MODEL's dequantized float32 path as the reference; both need the same tokenizer).

On the held-out English and Japanese texts in benchmarks/data (written for this benchmark, so no
model has seen them), each `--quantize` path's perplexity is printed beside the dequantized
float32 path's (`--quantize none`: the reference), with the relative difference; the goal is
within 1%. Then the share of positions where the two paths' greedy next token agrees. Each
low-bit model runs every `--paths` decode path a server may pick (sorai.model.quant.decode_path:
fp16 = fbgemm's float16 GEMM on a float16 copy, kernel = PyTorch's int4/int8 kernels for
generated rows and float32 GEMMs for prompt rows, as scored here).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from sorai import hub
from sorai.model.hardware import machine
from sorai.model.loader import load_model
from sorai.model.quant import decode_path

DATA = Path(__file__).resolve().parent / "data"
TEXTS = {"English": DATA / "heldout_en.txt", "Japanese": DATA / "heldout_ja.txt"}


def logits_of(model, ids: list[int], window: int = 512) -> torch.Tensor:
    """Next-token logits for every position, in non-overlapping windows of `window` tokens."""
    pieces = []
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start : start + window]])
            pieces.append(model(chunk)[0].float())
    return torch.cat(pieces)[: len(ids) - 1]


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    targets = torch.tensor(ids[1:])
    return math.exp(torch.nn.functional.cross_entropy(logits, targets).item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=hub.DEFAULT_MODEL)
    parser.add_argument("--quantize", default="auto,int8", help="paths to compare with none")
    parser.add_argument("--paths", default="fp16,kernel", help="low-bit decode paths to score")
    parser.add_argument(
        "--reference", default=None, help="the reference model (default: --model), run dequantized"
    )
    args = parser.parse_args()
    path = hub.resolve(args.model, progress=print)
    reference_path = hub.resolve(args.reference or args.model, progress=print)
    print(f"model {args.model}; reference {args.reference or args.model} dequantized to float32")
    print(f"{machine().describe()}")
    reference, tokenizer = load_model(reference_path, "float32", quantize="none")
    texts = {name: tokenizer.encode(file.read_text()) for name, file in TEXTS.items()}
    base = {name: logits_of(reference, ids) for name, ids in texts.items()}
    del reference
    for quantize in args.quantize.split(","):
        model, _ = load_model(path, "float32", quantize=quantize)
        for low_bit_path in args.paths.split(","):
            chosen, why = decode_path.choose(model, 1, low_bit_path)
            if chosen != low_bit_path:
                print(f"quantize={quantize}: path {low_bit_path} not run here: {why}")
                continue
            decode_path.use(model, chosen)
            for name, ids in texts.items():
                ours = logits_of(model, ids)
                ppl, ref = perplexity(ours, ids), perplexity(base[name], ids)
                agree = (ours.argmax(-1) == base[name].argmax(-1)).float().mean().item()
                print(
                    f"{name:8s} {len(ids):4d} tokens  quantize={quantize:5s} path={chosen:6s} "
                    f"ppl {ppl:8.3f}  none {ref:8.3f}  {100 * (ppl / ref - 1):+.2f}%  "
                    f"greedy agreement {100 * agree:.1f}%"
                )
        del model


if __name__ == "__main__":
    main()
