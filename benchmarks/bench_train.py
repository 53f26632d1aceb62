"""Training throughput and peak memory: sorai vs a plain PyTorch loop over transformers / peft.

    python benchmarks/bench_train.py [--methods lora,full] [--seq-len 256] [--micro-batch 8]
        [--steps 5] [--warmup 1] [--threads N] [--rounds 1] [--json train.json]

Both sides train the same weights on the same token rows with the same settings: float32, no
autocast, AdamW (lr 1e-4, no weight decay), gradient clipping at 1.0, one micro-batch per
optimizer step, every position a target (continued pretraining), LoRA r=8 alpha=16 dropout 0 on
every Linear of the blocks. The default model's GGUF is converted once, by sorai, into a
Hugging Face directory (~/.cache/sorai/bench-train/<model>-hf) that both sides load.

- sorai: `Trainer(config).setup()` then `trainer.train_step([batch])` on the batches of
  `trainer.loader`, i.e. the step `sorai train` runs, on a text-format JSONL file whose documents
  each fill one row of exactly seq_len tokens.
- peer: `AutoModelForCausalLM` (sdpa attention), `peft.get_peft_model` for LoRA, and the loop
  `loss = model(input_ids=x, labels=x).loss; loss.backward(); clip_grad_norm_; opt.step();
  opt.zero_grad(set_to_none=True)` with `torch.optim.AdamW` at its defaults.

Each (system, method) runs in its own fresh process, so its peak RSS (ru_maxrss from wait4) is
its own, imports and model loading included; runs alternate sorai and peer. Tokens/s is the
median over the timed steps of micro_batch * seq_len / step time. MFU is achieved FLOP/s over
the best float32 [2048 x 576] @ [576 x 1536] matmul rate measured in the same process at the
same thread count (the formula is printed). The machine should be otherwise idle: the load
average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import without_nan  # benchmarks/common.py: the script's folder is on sys.path

SYSTEMS = ("sorai", "peer")
METHODS = ("lora", "full")
GOALS = {  # method: (min sorai/peer tokens/s, max sorai/peer peak RSS)
    "lora": (1.3, 0.5),
    "full": (1.1, 0.5),
}
LORA_R = 8
LORA_ALPHA = 16.0
LR = 1e-4
MAX_GRAD_NORM = 1.0
PEAK_SHAPE = (2048, 576, 1536)  # [M x K] @ [K x N]
BF16_PEAK_ROWS = 128  # bf16 is ~50-100x slower than fp32 on CPUs without AMX: a smaller M
FLOPS_FORMULA = (
    "FLOPs/token: full = 6*N + 6*L*T*d_attn; lora = 4*N + 6*N_lora + 6*L*T*d_attn; "
    "N = matmul weights of the blocks + the head (the embedding lookup is not a matmul), "
    "N_lora = LoRA A and B weights, d_attn = heads * head_dim, T = seq_len; forward 2N, "
    "input gradients 2N, weight gradients 2N (full only); attention QK^T and PV: 12*L*T*d_attn "
    "forward + backward, halved for the causal mask"
)

# ----------------------------------------------------------------------------------------------
# Corpus: deterministic English and Japanese prose

EN_SUBJECTS = [
    "The lighthouse keeper",
    "A grey cat",
    "The old fisherman",
    "Her younger brother",
    "The village teacher",
    "A tired engineer",
    "The harbour master",
    "Our neighbour",
    "The train driver",
    "A student from the city",
]
EN_VERBS = [
    "watched",
    "remembered",
    "carried",
    "painted",
    "wrote about",
    "repaired",
    "talked about",
    "searched for",
    "listened to",
    "forgot",
]
EN_OBJECTS = [
    "the storm over the bay",
    "a letter from the mainland",
    "the broken radio",
    "the boats in the harbour",
    "a map of the northern islands",
    "the lamp at the top of the tower",
    "the price of rice and fish",
    "an old song about the sea",
    "the timetable of the morning ferry",
    "the number of stars in the winter sky",
]
EN_ENDS = [
    "before the sun went down.",
    "every evening after dinner.",
    "while the kettle boiled.",
    "because nobody else would.",
    "for the third time that week.",
    "and then went to sleep.",
    "until the rain stopped.",
    "without saying a word.",
]
JA_SUBJECTS = ["灯台守は", "灰色の猫は", "年老いた漁師は", "村の先生は", "疲れた技術者は", "港長は"]
JA_OBJECTS = [
    "湾の上の嵐を",
    "本土からの手紙を",
    "壊れたラジオを",
    "港の船を",
    "北の島々の地図を",
    "塔の上のランプを",
    "冬の夜空の星を",
]
JA_VERBS = [
    "見ていた。",
    "思い出した。",
    "運んだ。",
    "描いた。",
    "直した。",
    "探した。",
    "忘れた。",
]
JA_ENDS = ["夕食の後で", "雨が止むまで", "誰にも言わずに", "その週に三度目", "朝の船が来る前に"]


def sentence(rng: random.Random, japanese: bool) -> str:
    if japanese:
        return (
            rng.choice(JA_SUBJECTS)
            + rng.choice(JA_ENDS)
            + rng.choice(JA_OBJECTS)
            + rng.choice(JA_VERBS)
        )
    return (
        f" {rng.choice(EN_SUBJECTS)} {rng.choice(EN_VERBS)} {rng.choice(EN_OBJECTS)} "
        f"{rng.choice(EN_ENDS)}"
    )


def make_documents(tokenizer: Any, count: int, min_tokens: int, seed: int) -> list[str]:
    """`count` documents of at least `min_tokens` tokens each; every fourth one Japanese."""
    rng = random.Random(f"bench-train:{seed}")
    docs = []
    for i in range(count):
        japanese = i % 4 == 3
        parts: list[str] = []
        while True:
            parts.append(sentence(rng, japanese))
            if len(parts) % 8 == 0 and len(tokenizer.encode("".join(parts))) >= min_tokens:
                break
        docs.append("".join(parts).strip())
    return docs


# ----------------------------------------------------------------------------------------------
# Measurements shared by the workers (run inside a worker process)


def proc_status_mib() -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS so far) of this process, MiB; empty where /proc is missing."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


def max_rss_kib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def matmul_gflops(dtype_name: str, rows: int, reps: int) -> float:
    """Best GFLOP/s of a [rows x K] @ [K x N] matmul (PEAK_SHAPE's K and N) over `reps`."""
    import torch

    dtype = getattr(torch, dtype_name)
    _, k, n = PEAK_SHAPE
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(rows, k, generator=gen).to(dtype)
    b = torch.randn(k, n, generator=gen).to(dtype)
    a @ b  # warm-up: kernel selection, page faults
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * rows * k * n / best / 1e9


def timed_steps(
    step: Any, batches: list[Any], warmup: int, label: str
) -> tuple[list[float], list[float]]:
    """Run `step(batch)` (returning the loss) over `batches`; times of the steps after
    `warmup`, and every step's loss."""
    times, losses = [], []
    for i, batch in enumerate(batches):
        started = time.perf_counter()
        loss = step(batch)
        elapsed = time.perf_counter() - started
        losses.append(loss)
        timed = i >= warmup
        if timed:
            times.append(elapsed)
        kind = "timed" if timed else "warm-up"
        print(
            f"    {label}: step {i + 1}/{len(batches)} ({kind}) {elapsed:.2f} s, loss {loss:.4f}",
            flush=True,
        )
    return times, losses


def load_rows(work: Path) -> list[list[int]]:
    return json.loads((work / "rows.json").read_text())


def batch_rows(rows: list[list[int]], micro_batch: int, count: int) -> list[list[list[int]]]:
    return [rows[i * micro_batch : (i + 1) * micro_batch] for i in range(count)]


# ----------------------------------------------------------------------------------------------
# Workers


def worker_prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Convert the model to an HF directory (once, cached), write the corpus and its rows."""
    import torch

    import sorai
    from sorai import hub
    from sorai.model.tokenizer import Tokenizer
    from sorai.train.data import load_dataset

    torch.set_num_threads(args.threads)
    default_dir = hub.sorai_home() / "bench-train" / f"{args.model}-hf"
    hf_dir = Path(args.hf_dir) if args.hf_dir else default_dir
    if not (hf_dir / "config.json").exists():
        print(f"  converting {args.model} to a Hugging Face directory {hf_dir}", flush=True)
        llm = sorai.load(args.model, dtype=torch.float32, device="cpu", progress=print)
        partial = hf_dir.with_name(hf_dir.name + ".partial")
        llm.save(partial)
        partial.rename(hf_dir)
        del llm
    tokenizer = Tokenizer.from_dir(hf_dir)
    count = (args.warmup + args.steps) * args.micro_batch
    docs = make_documents(tokenizer, count, args.seq_len + 16, args.seed)
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    # The rows are what sorai's own text-format reader makes of the corpus, so both sides get
    # exactly the token ids `sorai train` trains on.
    data = load_dataset(
        corpus, tokenizer, max_length=args.seq_len, format="text", overflow="truncate"
    )
    rows = [example.input_ids for example in data.train]
    lengths = sorted({len(r) for r in rows})
    if len(rows) != count or lengths != [args.seq_len]:
        raise SystemExit(
            f"corpus: {len(rows)} rows of lengths {lengths}, wanted {count} of {args.seq_len}"
        )
    (work / "rows.json").write_text(json.dumps(rows))
    bf16 = matmul_gflops("bfloat16", BF16_PEAK_ROWS, 2) if args.bf16_note else float("nan")
    return {
        "hf_dir": str(hf_dir),
        "corpus": str(corpus),
        "rows": len(rows),
        "documents_japanese": sum(1 for i in range(count) if i % 4 == 3),
        "matmul_fp32_gflops": matmul_gflops("float32", PEAK_SHAPE[0], 5),
        "matmul_bf16_gflops": bf16,
        "sorai_version": sorai.__version__,
        "torch_version": torch.__version__,
    }


def sorai_overrides(args: argparse.Namespace, method: str, hf_dir: str, work: Path) -> dict:
    overrides: dict[str, Any] = {
        "model": hf_dir,
        "output_dir": str(work / f"sorai-{method}"),
        "method": method,
        "seed": args.seed,
        "data": {
            "train": str(work / "corpus.jsonl"),
            "format": "text",
            "seq_len": args.seq_len,
            "overflow": "truncate",
            "pack": True,  # one document per row here: nothing is packed, no mask is needed
            "shuffle": False,  # rows in file order, as the peer takes them
        },
        "lora": {
            "r": LORA_R,
            "alpha": LORA_ALPHA,
            "dropout": 0.0,
            "target_modules": "all-linear",
        },
        "optim": {"lr": LR, "weight_decay": 0.0, "max_grad_norm": MAX_GRAD_NORM},
        "schedule": {"kind": "constant", "warmup_steps": 0},
        "train": {
            "micro_batch_size": args.micro_batch,
            "grad_accum": 1,
            "max_steps": args.warmup + args.steps,
            "precision": "fp32",
            "device": "cpu",
            "threads": args.threads,
        },
        "checkpoint": {"every": 0},
        "log": {"progress": False, "tensorboard": False},
    }
    import yaml

    for item in args.sorai_set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--sorai-set {item!r}: expected section.field=value")
        section, _, name = key.rpartition(".")
        value = yaml.safe_load(raw)
        if section:
            overrides.setdefault(section, {})[name] = value
        else:
            overrides[name] = value
    return overrides


def worker_sorai(args: argparse.Namespace, work: Path, prep: dict) -> dict[str, Any]:
    import torch

    from sorai.train.config import resolve
    from sorai.train.trainer import Trainer

    rss_import = proc_status_mib()
    config = resolve(None, sorai_overrides(args, args.method, prep["hf_dir"], work))
    trainer = Trainer(config)
    trainer.setup()  # sets the thread count from train.threads
    count = args.warmup + args.steps
    batches = []
    for batch in trainer.loader:
        batches.append(batch)
        if len(batches) == count:
            break
    expected = batch_rows(load_rows(work), args.micro_batch, count)
    for i, (batch, rows) in enumerate(zip(batches, expected, strict=True)):
        if not torch.equal(batch.input_ids, torch.tensor(rows)):
            raise SystemExit(f"sorai batch {i} is not the peer's rows: the corpus did not fit")
        if bool((batch.document_ids != 0).any()):
            raise SystemExit(f"sorai batch {i} holds padding or several documents per row")
    targets = [b.num_targets for b in batches]
    rss_setup = proc_status_mib()

    def step(batch: Any) -> float:
        return trainer.train_step([batch])["loss"]

    times, losses = timed_steps(step, batches, args.warmup, f"sorai {args.method}")
    return {
        "threads": torch.get_num_threads(),
        "trainable_params": sum(p.numel() for p in trainer.params),
        "targets_per_step": targets[0] if len(set(targets)) == 1 else targets,
        "step_times": times,
        "losses": losses,
        "rss_after_import_mib": rss_import,
        "rss_after_setup_mib": rss_setup,
        "versions": {"torch": torch.__version__, "sorai": prep["sorai_version"]},
    }


def worker_peer(args: argparse.Namespace, work: Path, prep: dict) -> dict[str, Any]:
    import peft
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    rss_import = proc_status_mib()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(
        prep["hf_dir"], dtype=torch.float32, attn_implementation="sdpa"
    )
    model.train()
    if args.method == "lora":
        lora = peft.LoraConfig(
            r=LORA_R,
            lora_alpha=LORA_ALPHA,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    count = args.warmup + args.steps
    batches = [torch.tensor(rows) for rows in batch_rows(load_rows(work), args.micro_batch, count)]
    # transformers shifts the labels itself: every position but the last of a row is a target.
    targets = [int(x[:, 1:].numel()) for x in batches]
    rss_setup = proc_status_mib()

    def step(x: Any) -> float:
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    times, losses = timed_steps(step, batches, args.warmup, f"peer {args.method}")
    return {
        "threads": torch.get_num_threads(),
        "trainable_params": sum(p.numel() for p in params),
        "targets_per_step": targets[0] if len(set(targets)) == 1 else targets,
        "step_times": times,
        "losses": losses,
        "rss_after_import_mib": rss_import,
        "rss_after_setup_mib": rss_setup,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }


def worker_main(args: argparse.Namespace) -> None:
    work = Path(args.work)
    if args.worker == "sorai":
        # The wait policy `sorai train` runs with, chosen before torch loads (sorai/openmp.py).
        from sorai import openmp

        openmp.choose(openmp.TRAIN)
    if args.worker == "prepare":
        result = worker_prepare(args, work)
    else:
        prep = json.loads((work / "prepare.json").read_text())
        run = worker_sorai if args.worker == "sorai" else worker_peer
        result = run(args, work, prep)
        result["rss_end_mib"] = proc_status_mib()
        # After the steps, so the matmul's buffers cannot raise the training peak.
        result["matmul_fp32_gflops"] = matmul_gflops("float32", PEAK_SHAPE[0], 5)
    result["ru_maxrss_self_kib"] = max_rss_kib()
    Path(args.result).write_text(json.dumps(without_nan(result)))


# ----------------------------------------------------------------------------------------------
# Orchestration (the parent process imports neither torch nor sorai)


def worker_command(args: argparse.Namespace, worker: str, work: Path, result: Path) -> list[str]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        worker,
        "--work",
        str(work),
        "--result",
        str(result),
        "--model",
        args.model,
        "--seq-len",
        str(args.seq_len),
        "--micro-batch",
        str(args.micro_batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
    ]
    if args.hf_dir:
        command += ["--hf-dir", args.hf_dir]
    if not args.bf16_note:
        command.append("--no-bf16-note")
    for item in args.sorai_set:
        command += ["--sorai-set", item]
    if worker in SYSTEMS:
        command += ["--method", args.method]
    return command


def run_worker(args: argparse.Namespace, worker: str, work: Path, label: str) -> dict[str, Any]:
    """Run one worker process; its result plus its peak RSS as wait4 reports it."""
    result = work / f"{label}.json"
    log_path = work / f"{label}.log"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(worker_command(args, worker, work, result), stderr=log, env=env)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise SystemExit(f"{label} failed (exit {proc.returncode}); its log ends:\n{tail}")
    out = json.loads(result.read_text())
    out["wall_s"] = time.perf_counter() - started
    out["peak_rss_gib"] = usage.ru_maxrss / 2**20  # wait4: KiB on Linux
    return out


def model_flops(config: dict[str, Any], seq_len: int) -> dict[str, Any]:
    """N, N_lora and FLOPs per token of each method, from an HF config.json."""
    d = config["hidden_size"]
    layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or d // heads
    ffn = config["intermediate_size"]
    vocab = config["vocab_size"]
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, ffn), (d, ffn), (ffn, d)]  # (in, out)
    n_blocks = layers * sum(i * o for i, o in shapes)
    n_head = vocab * d
    n = n_blocks + n_head
    n_lora = layers * sum(LORA_R * (i + o) for i, o in shapes)
    attention = 6 * layers * seq_len * q  # 12 * L * T * d_attn, halved (causal)
    return {
        "N": n,
        "N_blocks": n_blocks,
        "N_head": n_head,
        "N_lora": n_lora,
        "layers": layers,
        "d_attn": q,
        "flops_per_token": {
            "full": 6 * n + attention,
            "lora": 4 * n + 6 * n_lora + attention,
        },
        "formula": FLOPS_FORMULA,
    }


def summarize(
    runs: list[dict[str, Any]], tokens_per_step: int, flops_per_token: int
) -> dict[str, Any]:
    """One (system, method)'s rounds: medians of tokens/s, peak RSS, MFU."""
    rates = [statistics.median(tokens_per_step / t for t in r["step_times"]) for r in runs]
    peaks = [r["matmul_fp32_gflops"] for r in runs]
    rate = statistics.median(rates)
    peak = statistics.median(peaks)
    return {
        "tokens_per_s": rate,
        "tokens_per_s_rounds": rates,
        "peak_rss_gib": statistics.median(r["peak_rss_gib"] for r in runs),
        "peak_rss_gib_rounds": [r["peak_rss_gib"] for r in runs],
        "achieved_gflops": rate * flops_per_token / 1e9,
        "matmul_fp32_gflops": peak,
        "mfu": rate * flops_per_token / (peak * 1e9),
        "runs": runs,
    }


def print_report(
    methods: list[str], table: dict[str, dict[str, dict]], args: argparse.Namespace
) -> dict[str, Any]:
    print(
        f"\n{'':12s} {'tokens/s':>9s} {'peak RSS':>9s} {'GFLOP/s':>8s} {'matmul':>8s} "
        f"{'MFU':>6s} {'loss[0]':>8s} {'targets':>8s} {'trainable':>11s}"
    )
    for method in methods:
        for system in SYSTEMS:
            s = table[method][system]
            run = s["runs"][0]
            print(
                f"{system + ' ' + method:12s} {s['tokens_per_s']:9.1f} "
                f"{s['peak_rss_gib']:7.2f} G {s['achieved_gflops']:8.1f} "
                f"{s['matmul_fp32_gflops']:8.1f} {s['mfu']:6.1%} {run['losses'][0]:8.4f} "
                f"{run['targets_per_step']!s:>8s} {run['trainable_params']:11,d}"
            )
    print(f"\n(tokens/s: median of micro_batch * seq_len / step time over {args.steps} steps)")
    ratios = {}
    print()
    for method in methods:
        ours, theirs = table[method]["sorai"], table[method]["peer"]
        speed = ours["tokens_per_s"] / theirs["tokens_per_s"]
        memory = ours["peak_rss_gib"] / theirs["peak_rss_gib"]
        min_speed, max_memory = GOALS[method]
        speed_met, memory_met = speed >= min_speed, memory <= max_memory
        ratios[method] = {
            "tokens_per_s": speed,
            "peak_rss": memory,
            "goal_tokens_per_s": min_speed,
            "goal_peak_rss": max_memory,
            "tokens_per_s_met": speed_met,
            "peak_rss_met": memory_met,
        }
        print(
            f"{method:4s} sorai/peer tokens/s {speed:5.2f}x (goal >= {min_speed}x: "
            f"{'met' if speed_met else 'NOT met'}), peak RSS {memory:5.2f}x (goal <= "
            f"{max_memory}x: {'met' if memory_met else 'NOT met'})"
        )
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--methods", default="lora,full", help="comma-separated: lora, full")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each (system, method)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf-dir", default=None, help="HF directory of the model (converted)")
    parser.add_argument(
        "--sorai-set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="extra sorai train config, e.g. train.compile=true (YAML values; repeatable)",
    )
    parser.add_argument(
        "--no-bf16-note", dest="bf16_note", action="store_false", help="skip the bf16 matmul"
    )
    parser.add_argument("--json", "--out", type=Path, default=None, help="write the results here")
    parser.add_argument("--worker", choices=("prepare", *SYSTEMS), help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:
        if method not in METHODS:
            parser.error(f"--methods: unknown method {method!r} (lora, full)")
    if min(args.steps, args.rounds, args.seq_len - 1, args.micro_batch) < 1 or args.warmup < 0:
        parser.error("--steps, --rounds, --micro-batch must be >= 1, --seq-len >= 2, --warmup >= 0")
    load_before = os.getloadavg()[0]
    print(
        f"model {args.model}, seq_len {args.seq_len}, micro-batch {args.micro_batch}, "
        f"{args.warmup} warm-up + {args.steps} timed steps, {args.threads} threads, float32, "
        f"methods {','.join(methods)}, {args.rounds} round(s)\n"
        f"load average {load_before:.1f} on {os.cpu_count()} CPUs "
        f"(other work on the machine skews the results)"
    )
    tokens_per_step = args.micro_batch * args.seq_len
    table: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="sorai-bench-train-") as tmp:
        work = Path(tmp)
        print("preparing: model directory, corpus, matmul peak", flush=True)
        prep = run_worker(args, "prepare", work, "prepare")
        (work / "prepare.json").write_text(json.dumps(prep))
        config = json.loads((Path(prep["hf_dir"]) / "config.json").read_text())
        flops = model_flops(config, args.seq_len)
        bf16 = prep["matmul_bf16_gflops"]  # None with --no-bf16-note
        print(
            f"  {prep['hf_dir']}: N {flops['N']:,d} (blocks {flops['N_blocks']:,d} + head "
            f"{flops['N_head']:,d}), N_lora {flops['N_lora']:,d}\n"
            f"  {prep['rows']} rows of {args.seq_len} tokens "
            f"({prep['documents_japanese']} Japanese documents)\n"
            f"  matmul {PEAK_SHAPE[0]}x{PEAK_SHAPE[1]} @ {PEAK_SHAPE[1]}x{PEAK_SHAPE[2]}: "
            f"float32 {prep['matmul_fp32_gflops']:.1f} GFLOP/s; bfloat16 ({BF16_PEAK_ROWS} rows) "
            + (f"{bf16:.1f} GFLOP/s" if bf16 is not None else "not measured")
        )
        if bf16 is not None and bf16 < prep["matmul_fp32_gflops"] / 2:
            print("  (bfloat16 matmuls are slow on this CPU: both sides train in float32)")
        runs: dict[tuple[str, str], list[dict]] = {}
        for round_ in range(args.rounds):
            order = SYSTEMS if round_ % 2 == 0 else SYSTEMS[::-1]
            for method in methods:
                args.method = method
                for system in order:
                    label = f"{system}-{method}-{round_}"
                    print(f"  {system} {method} (round {round_ + 1})", flush=True)
                    run = run_worker(args, system, work, label)
                    print(
                        f"  {system} {method}: peak RSS {run['peak_rss_gib']:.2f} GiB, "
                        f"{run['wall_s']:.0f} s in all",
                        flush=True,
                    )
                    runs.setdefault((system, method), []).append(run)
    for method in methods:
        per_token = flops["flops_per_token"][method]
        table[method] = {
            system: summarize(runs[(system, method)], tokens_per_step, per_token)
            for system in SYSTEMS
        }
        targets = {s: table[method][s]["runs"][0]["targets_per_step"] for s in SYSTEMS}
        if targets["sorai"] != targets["peer"]:
            print(f"WARNING {method}: targets per step differ: {targets}")
    ratios = print_report(methods, table, args)
    print(f"\nMFU = tokens/s * FLOPs/token / measured float32 matmul peak; {FLOPS_FORMULA}")
    for method in methods:
        print(f"  {method}: {flops['flops_per_token'][method] / 1e9:.3f} GFLOP/token")
    load_after = os.getloadavg()[0]
    print(f"load average {load_after:.1f} after")
    if args.json:
        result = {
            "command": shlex.join([sys.executable, *sys.argv]),
            "settings": {
                "model": args.model,
                "seq_len": args.seq_len,
                "micro_batch": args.micro_batch,
                "steps": args.steps,
                "warmup": args.warmup,
                "rounds": args.rounds,
                "threads": args.threads,
                "dtype": "float32",
                "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "targets": "all-linear"},
                "lr": LR,
                "max_grad_norm": MAX_GRAD_NORM,
                "sorai_set": args.sorai_set,
            },
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "load_average_before": load_before,
                "load_average_after": load_after,
            },
            "prepare": prep,
            "flops": flops,
            "results": table,
            "ratios": ratios,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(without_nan(result), indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
