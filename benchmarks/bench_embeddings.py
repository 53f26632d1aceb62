"""Sentence embeddings: sorai's encoder (sorai/model/bert.py) against sentence-transformers on the
same model files and the same texts, in one process, rounds interleaved.

    python benchmarks/bench_embeddings.py [--chunks 256] [--queries 256] [--rounds 5] \
        [--dtype auto|float32|bfloat16] [--threads N] [--device cpu|cuda] [--no-index]

Texts: `--chunks` chunks of English and Japanese prose (every fourth Japanese), whole sentences up
to 800 characters (as `sorai index add` cuts them), and `--queries` short search queries. Each
round encodes the chunks, then the queries, with both (which goes first alternates). Printed:
CPU flags, load average, torch threads and sorai's dtype; per workload the median chunks/s of
both, the ratio, and the min/mean cosine of sorai's vectors against sentence-transformers'
float32 ones; then `sorai index add` of a folder holding the chunks (a subprocess: sorai's
server in that process, its embed time as it reports it).

Beside both encoders each round also times sorai's matmuls alone: the encoder's Linear layers on
the very batch shapes its encode() runs (same length buckets), nothing else. No path in that
dtype can beat it, so sentence-transformers' time over it is the ceiling of the ratio on this
machine: where the ceiling itself is under 2x, only a faster matmul (bf16 on AVX-512 BF16 / AMX,
a GPU) can reach the goal, not less overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import without_nan  # noqa: E402

from sorai import hub  # noqa: E402
from sorai.model import hardware  # noqa: E402
from sorai.model.bert import SentenceEncoder, length_batches  # noqa: E402

CHUNK_CHARS = 800

ENGLISH = """\
The river rose slowly through the night, and by morning the lower fields were under water.
Farmers gathered on the bridge to watch the current carry branches and fence posts to the sea.
Nobody in the village could remember a flood this early in the spring.
The old schoolteacher said her grandmother had told stories of such a year, before the dam.
Children were sent to the church on the hill, where the floor was dry and the stove was lit.
By noon the rain had stopped, but the river kept rising, fed by snow melting in the mountains.
A small boat appeared at the bend, rowed by two men who had come to help from the next valley.
They brought bread, blankets and a radio, which they set on the altar for everyone to hear.
The announcer spoke of closed roads, broken power lines and a train stranded between stations.
In the city, engineers worked through the weekend to repair the pumping station by the harbour.
The committee met on Tuesday to discuss the budget for the coming year.
Most of the money would go to the library, which needed a new roof and better heating.
Some members argued that the park deserved more, since its paths had not been repaired in years.
After two hours of debate, they agreed to split the remaining funds between the two projects.
The chairman thanked everyone for their patience and closed the meeting just before dinner.
Modern processors execute many instructions at once, as long as they do not depend on each other.
A program that walks a linked list cannot benefit, because each step waits for the previous load.
Arrays, on the other hand, let the hardware fetch the next elements before they are needed.
This is why a simple loop over contiguous memory often beats a clever algorithm that jumps around.
Caches reward locality, and the difference between a hit and a miss can be a hundred cycles.
She learned to bake bread from her father, who woke at four every morning to light the oven.
The dough had to rest twice, once after mixing and again after shaping, and neither could be rushed.
On Saturdays the line outside the shop reached the corner, and the first loaves sold within an hour.
Years later, in a small apartment far from home, she still woke early on weekends out of habit.
The smell of yeast and flour always brought back the sound of his radio playing in the back room.
The expedition reached the glacier at the end of the third week, later than planned.
Storms had kept them in their tents for four days, and their supplies were running low.
The leader decided to send two climbers ahead to mark a route across the crevasse field.
They returned at dusk with frozen beards and good news: the ice was firmer than it looked.
The next morning the whole team crossed in single file, roped together, without a single fall.
Good documentation explains not only what a function does but why it exists at all.
A reader who understands the purpose can often guess the details, while the reverse is rare.
Examples help more than long descriptions, especially when they show a common mistake and its fix.
The best manuals are short, because their authors took the time to remove everything unnecessary.
When the train finally left the station, the passengers applauded as if they had won a prize.
The conductor smiled and announced that lunch would be served in the dining car within the hour.
Outside, the fields gave way to forests, and the forests to a lake so still it looked like glass.
An old man by the window said he had taken this journey every summer for fifty years.
He pointed out a lighthouse, a ruined castle and a farm where, he claimed, his mother was born.
The museum reopened after three years of work, with a new wing devoted to maps and navigation.
Visitors can now see a globe from the sixteenth century that shows a continent that never existed.
The curator explained that mapmakers often filled empty spaces with guesses, rumours and monsters.
A separate room holds instruments that sailors used to find their position from the stars.
Most of them still work, and on clear nights the staff take them to the roof to demonstrate."""

JAPANESE = """\
夜のあいだに川の水位はゆっくりと上がり、朝には低い畑がすっかり水に沈んでいた。
農家の人たちは橋の上に集まり、流れが枝や杭を海のほうへ運んでいくのを黙って見ていた。
春のこんなに早い時期に洪水が起きたことを覚えている者は、村には一人もいなかった。
年老いた先生は、ダムができるずっと前に祖母からそんな年の話を聞いたことがあると言った。
子どもたちは丘の上の教会へ行かされ、そこでは床が乾いていて、ストーブにはもう火が入っていた。
昼には雨がやんだが、山の雪が解けた水が流れ込み、川はなおも上がり続けた。
曲がり角に小さな舟が現れ、隣の谷から手伝いに来た二人の男がそれを漕いでいた。
彼らはパンと毛布とラジオを持ってきて、皆がニュースを聞けるように祭壇の上に置いた。
アナウンサーは通行止めの道路や切れた電線、二つの駅のあいだで止まった列車について話した。
町では技術者たちが週末も休まず、港のそばのポンプ場の修理を続けていた。
委員会は火曜日に集まり、来年度の予算について話し合った。
予算の大部分は図書館に回される予定で、新しい屋根とよりよい暖房が必要だった。
十年も道が直されていない公園にもっと目を向けるべきだと主張する委員もいた。
二時間の議論のあと、残りの予算を二つの事業で分けることで合意した。
議長は皆の辛抱に礼を述べ、夕食の少し前に会議を閉じた。
現代のプロセッサは、互いに依存しない命令であれば一度に多くを実行できる。
連結リストをたどるプログラムは、各段階が前の読み込みを待つため、その恩恵を受けられない。
一方で配列なら、ハードウェアは必要になる前に次の要素を取り寄せておける。
だからこそ、連続したメモリを素直にたどるループが、巧妙なアルゴリズムに勝つことが多い。
キャッシュは局所性に報いるもので、ヒットとミスの差は百サイクル以上になることもある。
彼女はパンの焼き方を父から教わった。父は毎朝四時に起きて窯に火を入れていた。
生地は混ぜたあとと成形したあとの二回休ませる必要があり、どちらも急ぐことはできなかった。
土曜日には店の前の行列が角まで伸び、最初に焼けたパンは一時間もしないうちに売り切れた。
故郷から遠い小さなアパートで暮らすようになっても、彼女は週末になると習慣で早く目を覚ました。
イーストと小麦粉の匂いをかぐと、奥の部屋で流れていた父のラジオの音がいつもよみがえった。
遠征隊が氷河にたどり着いたのは三週目の終わりで、予定より遅れていた。
嵐のせいで四日間テントから出られず、食料は残り少なくなっていた。
隊長は二人の登山者を先に行かせ、クレバス帯を抜ける道に印をつけさせることにした。
二人は夕暮れに髭を凍らせて戻ってきたが、氷は見た目より固いという良い知らせを持っていた。
翌朝、隊の全員がザイルで結ばれて一列になり、一人も落ちることなく渡りきった。
よい文書は、関数が何をするかだけでなく、そもそもなぜそれがあるのかを説明する。
目的を理解した読者は細部を推測できることが多いが、その逆はめったにない。
長い説明よりも例のほうが役に立ち、よくある間違いとその直し方を示す例は特にそうだ。
最良のマニュアルは短い。書き手が不要なものをすべて取り除く手間を惜しまなかったからだ。
列車がようやく駅を出ると、乗客たちはまるで賞を取ったかのように拍手をした。
車掌はほほえみ、一時間以内に食堂車で昼食が出されると告げた。
窓の外では畑が森に変わり、森はやがてガラスのように静かな湖に変わった。
窓際の老人は、五十年間毎年夏にこの旅をしてきたのだと言った。
彼は灯台や崩れた城、そして母親が生まれたという農場を指さして教えてくれた。
博物館は三年間の改装を終えて再開し、地図と航海に関する新しい展示棟ができた。
訪れた人は、存在しない大陸が描かれた十六世紀の地球儀を見ることができる。
学芸員によると、地図の作り手は空白を推測やうわさ、海の怪物で埋めることがよくあったという。
別の部屋には、船乗りが星から自分の位置を知るために使った道具が並んでいる。
その多くは今でも使うことができ、晴れた夜には職員が屋上に持ち出して使い方を見せてくれる。"""

# fmt: off
QUERY_WORDS = ["flood", "river", "village", "bridge", "budget", "library", "park", "processor",
               "cache", "memory", "bread", "oven", "glacier", "expedition", "documentation",
               "examples", "train", "station", "museum", "maps", "globe", "stars"]
# fmt: on
JA_QUERIES = [
    "川の洪水",
    "図書館の予算",
    "キャッシュの局所性",
    "パンの焼き方",
    "氷河の遠征",
    "博物館の地図",
]


def make_chunks(count: int, seed: int = 0) -> list[str]:
    """`count` chunks of whole sentences, each up to CHUNK_CHARS characters; every fourth is
    Japanese."""
    rng = random.Random(f"bench-embeddings:{seed}")
    english, japanese = ENGLISH.splitlines(), JAPANESE.splitlines()
    chunks = []
    for i in range(count):
        pool, sep = (japanese, "") if i % 4 == 3 else (english, " ")
        text = rng.choice(pool)
        while True:
            nxt = text + sep + rng.choice(pool)
            if len(nxt) > CHUNK_CHARS:
                break
            text = nxt
        chunks.append(text)
    return chunks


def make_queries(count: int, seed: int = 0) -> list[str]:
    """`count` search queries of 2-6 words (every sixth Japanese)."""
    rng = random.Random(f"bench-embeddings-queries:{seed}")
    return [
        rng.choice(JA_QUERIES)
        if i % 6 == 5
        else " ".join(rng.sample(QUERY_WORDS, rng.randint(2, 6)))
        for i in range(count)
    ]


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def timed(fn: Callable[[], object], device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def cosines(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    values = F.cosine_similarity(ours.float(), theirs.float(), dim=-1)
    return values.min().item(), values.mean().item()


def matmul_floor(encoder: SentenceEncoder, texts: Sequence[str]) -> Callable[[], object]:
    """A run of the encoder's Linear layers alone on the batches encode(texts) runs: per length
    bucket, each layer's four matmuls on [rows, in] inputs (values do not change their speed)."""
    lengths = [len(ids) for ids in encoder.tokenize(texts)]
    rows = [len(batch) * lengths[batch[0]] for batch in length_batches(lengths)]
    linears = [
        (layer.qkv, layer.attn_out, layer.mlp_in, layer.mlp_out) for layer in encoder.model.layers
    ]
    dtype, device = encoder.dtype, encoder.device
    generator = torch.Generator().manual_seed(0)
    widest = max(rows)
    inputs = {
        width: torch.randn(widest, width, generator=generator).to(device, dtype)
        for width in {linear.in_features for layer in linears for linear in layer}
    }

    @torch.inference_mode()
    def run() -> None:
        for n in rows:
            for layer in linears:
                for linear in layer:
                    linear(inputs[linear.in_features][:n])

    return run


def bench_workload(
    name: str,
    texts: Sequence[str],
    encoder: SentenceEncoder,
    st,
    reference: torch.Tensor,
    rounds: int,
    device: torch.device,
) -> dict[str, object]:
    """Both encoders on `texts`, rounds interleaved (the first one alternates)."""
    peers: dict[str, Callable[[], object]] = {
        "sorai": lambda: encoder.encode(texts),
        "sentence-transformers": lambda: st.encode(list(texts), convert_to_numpy=True),
    }
    floor = matmul_floor(encoder, texts)
    for fn in (*peers.values(), floor):  # warm-up: allocator, kernels, first-use paths
        fn()
    times: dict[str, list[float]] = {peer: [] for peer in peers}
    floor_times: list[float] = []
    for r in range(rounds):
        order = list(peers) if r % 2 == 0 else list(reversed(peers))
        for peer in order:
            times[peer].append(timed(peers[peer], device))
        floor_times.append(timed(floor, device))
    rates = {peer: len(texts) / statistics.median(t) for peer, t in times.items()}
    # Per-round ratios: each pair ran back to back, so a load change hits both.
    ratios = [b / a for a, b in zip(times["sorai"], times["sentence-transformers"], strict=True)]
    ceilings = [b / a for a, b in zip(floor_times, times["sentence-transformers"], strict=True)]
    shares = [a / b for a, b in zip(floor_times, times["sorai"], strict=True)]
    cos_min, cos_mean = cosines(encoder.encode(texts), reference)
    tokens = [len(ids) for ids in encoder.tokenize(texts)]
    result = {
        "texts": len(texts),
        "mean_tokens": statistics.mean(tokens),
        "sorai_per_s": rates["sorai"],
        "st_per_s": rates["sentence-transformers"],
        "ratio": statistics.median(ratios),
        "cos_min": cos_min,
        "cos_mean": cos_mean,
        "matmul_per_s": len(texts) / statistics.median(floor_times),
        "matmul_share": statistics.median(shares),
        "ceiling": statistics.median(ceilings),
    }
    print(
        f"{name:8s} {len(texts):5d} texts, {result['mean_tokens']:5.1f} tokens mean: "
        f"sorai {rates['sorai']:8.2f}/s  sentence-transformers "
        f"{rates['sentence-transformers']:8.2f}/s  ratio {result['ratio']:.2f}x  "
        f"cosine min {cos_min:.6f} mean {cos_mean:.6f}"
    )
    print(
        f"{'':8s} sorai's matmuls alone {result['matmul_per_s']:8.2f}/s "
        f"({result['matmul_share']:.0%} of sorai's time): ceiling of the ratio in "
        f"{str(encoder.dtype).removeprefix('torch.')} {result['ceiling']:.2f}x"
    )
    return result


def bench_index(model_dir: Path, chunks: Sequence[str]) -> dict[str, object]:
    """`sorai index add` of a folder with one chunk per file: sorai's server in that process
    (the default chat model loads too), embeddings through its /v1/embeddings."""
    with tempfile.TemporaryDirectory(prefix="bench-embeddings-") as tmp:
        folder = Path(tmp) / "docs"
        folder.mkdir()
        for i, text in enumerate(chunks):
            (folder / f"{i:04d}.txt").write_text(text + "\n", encoding="utf-8")
        script = Path(sys.executable).with_name("sorai")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "sorai.cli"]
        command += ["index", "add", str(folder), "--index", str(Path(tmp) / "index.db")]
        command += ["--embedding-model", str(model_dir)]
        drop = {"SORAI_URL", "OPENAI_BASE_URL", "SORAI_API_KEY"}
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env["SORAI_DEFAULT_URL"] = "none"  # sorai's server in that process, not one on :8000
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
    output = done.stdout + done.stderr
    found = re.search(r"(\d+) chunks? written \(read [\d.]+s, embed ([\d.]+)s", output)
    if done.returncode != 0 or found is None:
        print(f"index    `sorai index add` failed (exit {done.returncode}):\n{output[-2000:]}")
        return {"error": output[-2000:]}
    written, embed_s = int(found.group(1)), float(found.group(2))
    print(
        f"index    `sorai index add` of {len(chunks)} files: {written} chunks, embed "
        f"{embed_s:.1f} s = {written / max(embed_s, 1e-9):.2f} chunks/s "
        f"(whole command {wall:.1f} s, model loads included)"
    )
    return {"chunks": written, "embed_s": embed_s, "per_s": written / max(embed_s, 1e-9)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-minilm-l6-v2", help="name or directory")
    parser.add_argument("--chunks", type=int, default=256)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="auto", help="sorai's: auto, float32, bfloat16")
    parser.add_argument(
        "--st-dtype", default="float32", help="sentence-transformers': float32 or bfloat16"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (both)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-index", action="store_true", help="skip `sorai index add`")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the same files for both, nothing online

    if args.threads:
        torch.set_num_threads(args.threads)
    machine = hardware.machine()
    device = torch.device(args.device)
    model_dir = Path(hub.resolve(args.model)) if not Path(args.model).is_dir() else Path(args.model)
    encoder = SentenceEncoder.from_dir(
        model_dir, device=device, dtype=None if args.dtype == "auto" else args.dtype
    )
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir), device=str(device))
    chunks, queries = make_chunks(args.chunks), make_queries(args.queries)
    # The reference: sentence-transformers in float32, whatever it is timed in.
    references = [
        torch.from_numpy(st.encode(texts, convert_to_numpy=True)) for texts in (chunks, queries)
    ]
    if args.st_dtype != "float32":
        st = st.to(getattr(torch, args.st_dtype))

    why = f": {hardware.auto_dtype(device)[1]}" if args.dtype == "auto" else ""
    print(f"machine: {machine.describe()}")
    print(f"load average before: {load_average()}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {model_dir}; "
        f"sorai {encoder.dtype} on {encoder.device} (--dtype {args.dtype}{why}); "
        f"sentence-transformers {args.st_dtype}; {args.rounds} rounds"
    )
    results: dict[str, object] = {
        "machine": machine.describe(),
        "flags": list(machine.flags),
        "threads": torch.get_num_threads(),
        "sorai_dtype": str(encoder.dtype),
        "st_dtype": args.st_dtype,
        "device": str(device),
    }
    for name, texts, reference in zip(
        ("chunks", "queries"), (chunks, queries), references, strict=True
    ):
        if texts:
            results[name] = bench_workload(name, texts, encoder, st, reference, args.rounds, device)
    if not args.no_index and chunks:
        results["index"] = bench_index(model_dir, chunks)
    print(f"load average after: {load_average()}")
    if "chunks" in results:
        ratio, cos_min = results["chunks"]["ratio"], results["chunks"]["cos_min"]  # type: ignore[index]
        print(
            f"goal: chunks >= 2x sentence-transformers: {ratio:.2f}x "
            f"({'met' if ratio >= 2 else 'not met'}); cosine >= 0.999: {cos_min:.6f} "
            f"({'met' if cos_min >= 0.999 else 'not met'}); ceiling in "
            f"{str(encoder.dtype).removeprefix('torch.')} "
            f"{results['chunks']['ceiling']:.2f}x"  # type: ignore[index]
        )
    if args.json:
        args.json.write_text(json.dumps(without_nan(results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
