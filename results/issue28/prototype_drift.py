"""How far Adv-DPNP's prototypes move from their random start, per run (issue 28).

For every adv-dpnp run folder with a checkpoint under RUNS/mnist/adv-dpnp: the prototypes at
initialisation (rebuilt exactly by the trainer's own `seeded_build`) and after training; the
mean / min angle between prototypes (MeanSep / MinSep of the
prototypes themselves) and how many degrees each prototype turned. Writes JSON lines.

    python results/issue28/prototype_drift.py /work/runs28 > results/issue28/prototype_drift.jsonl
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from benchmark.config import RunConfig
from benchmark.data import DataInfo
from benchmark.run.train import seeded_build
from benchmark.store import safe_torch_load

KEYS = ("lambda_dpp", "lambda_dnp", "lambda_dfa", "alpha", "dual_branch", "clean_branch",
        "train_attack_steps", "train_attack_loss", "prototype_lr_scale")


def angles(c: torch.Tensor) -> tuple[float, float]:
    """Mean and min pairwise angle (degrees) between the rows of c."""
    u = c / c.norm(dim=1, keepdim=True)
    i = torch.triu_indices(len(c), len(c), 1)
    a = torch.rad2deg(torch.acos((u @ u.t())[i[0], i[1]].clamp(-1, 1)))
    return round(a.mean().item(), 2), round(a.min().item(), 2)


def main(runs: Path) -> None:
    for run in sorted((runs / "mnist" / "adv-dpnp").iterdir()):
        if not (run / "ckpt_best.pt").exists() or not (run / "TRAINED").exists():
            continue
        c = json.loads((run / "config.json").read_text())
        cfg = RunConfig.from_dict(c)
        info = DataInfo(**{k: v for k, v in c["data"].items() if k in DataInfo.__dataclass_fields__})
        model = seeded_build(cfg, info)[1]
        c0 = next(p for n, p in model.named_parameters() if "prototypes" in n).detach().float()
        state = safe_torch_load(run / "ckpt_best.pt")
        c1 = next(v for k, v in (state.get("model") or state).items() if "prototypes" in k).float()
        turn = torch.rad2deg(torch.acos(torch.nn.functional.cosine_similarity(c0, c1).clamp(-1, 1)))
        print(json.dumps({"run_id": run.name, "seed": cfg.seed,
                          "variant": {k: c["hparams"][k] for k in KEYS if k in c["hparams"]},
                          "init_mean_min_deg": angles(c0), "trained_mean_min_deg": angles(c1),
                          "turned_mean_deg": round(turn.mean().item(), 2),
                          "turned_max_deg": round(turn.max().item(), 2)}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
