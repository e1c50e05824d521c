"""The DDM paper's comparison on the digits, at equal total training FLOPs (docs/design.md §2, the paper's Table 1).

A monolith (one expert on all data) against K-expert DDMs (K = 2, 4, 8, balanced k-means islands): the global
batch B is split evenly across the K experts (B/K each, same number of steps), and the router's training FLOPs
are given back to the monolith as extra steps. Every DDM is sampled with the strategies full, top1, top2,
sample1, threshold:0.1, trajectory and the hybrids trajectory:0.5:top1 and trajectory:0.2:top1, the two rows of a
guided sample routed by the conditional row; top1 and trajectory also with each row routed alone ("per-row").
Training is shared: strategies differ only at sampling. Reported: FID (digit-classifier features, vs the held-out
20% of the digits) over seeds, mean ± std; the class-frequency error (total variation between the classifier's
class shares in the samples and the class shares of the data); the island error (per class, total variation between
the islands of the samples, as the router names them at sigma = 0.05, and the data's islands of that class,
averaged over classes); the experts run per sample and step. Ablation: a random partition at K=4.

    python scripts/reproduce_ddm.py            # full: ~25 min on 2 idle cores (timed pieces: 1000 steps at batch 64
                                               # 39 s, at batch 8 14 s; 500 samples x 25 steps 4.4 s); 71 min with
                                               # --jobs 1 on the loaded shared machine; writes
                                               # docs/benchmarks/ddm_reproduce.json and docs/RESULTS.md
    python scripts/reproduce_ddm.py --quick    # tiny settings, < 5 min; writes under outputs/ unless told otherwise

Training runs the real island trainer (`ddm train`) and router trainer (`ddm train-router`), --jobs at a time.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDANCE = "conditional"  # the default rule: a guided sample's null-label row follows its conditional row
STRATEGIES = [(s, GUIDANCE) for s in ("full", "top1", "top2", "sample:1", "threshold:0.1", "trajectory",
                                       "trajectory:0.5:top1", "trajectory:0.2:top1")]
STRATEGIES += [("top1", "per-row"), ("trajectory", "per-row")]
ISLAND_SIGMA = 0.05  # where the router names a finished sample's island (its top-1 accuracy there is ~0.95)
PAPER_TABLE1 = [  # docs/design.md §2 (the paper's figures): ImageNet, 8 experts of DiT-XL/2, FID
    ("monolith", 308, 12.81), ("full", 2490, 10.52), ("top1", 334, 9.84), ("top2", 642, 10.31),
    ("sample:1", 334, 157.05), ("threshold:0.1", None, 10.15),
]
FULL = dict(ks=[2, 4, 8], seeds=[0, 1, 2], preset="tiny", steps=2000, batch_size=64, lr=1e-3, router_steps=800,
            router_batch=64, router_width=16, router_layers=1, n_samples=500, sample_steps=25, cfg=1.5)
QUICK = dict(ks=[2, 4], seeds=[0, 1], preset="tiny", steps=8, batch_size=8, lr=1e-3, router_steps=8,
             router_batch=16, router_width=16, router_layers=1, n_samples=24, sample_steps=2, cfg=1.5)


def cli(argv: list[str], log: Path) -> None:
    """Run one `ddm` command in this process, its chatter (progress bars) into a log file."""
    from frontends.cli import main

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        rc = main([str(a) for a in argv])
    if rc != 0:
        raise RuntimeError(f"`ddm {' '.join(map(str, argv))}` failed with {rc}; see {log}")


def worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def run_jobs(pool: ProcessPoolExecutor | None, fn, jobs: list) -> list:
    if pool is None:
        return [fn(*job) for job in jobs]
    return list(pool.map(fn, *zip(*jobs)))


def train_job(manifest: str, island: str, out: str, steps: int, batch: int, s: dict, seed: int) -> None:
    cli(["train", "--manifest", manifest, "--island", island, "--out", out, "--preset", s["preset"], "--steps", steps,
         "--batch-size", batch, "--lr", s["lr"], "--seed", seed, "--log-every", steps, "--checkpoint-every", steps],
        Path(out).parent / "train.log")


def router_job(manifest: str, experts: list[str], out: str, s: dict, seed: int) -> None:
    cli(["train-router", "--manifest", manifest, "--experts", *experts, "--out", out, "--steps", s["router_steps"],
         "--batch-size", s["router_batch"], "--width", s["router_width"], "--layers", s["router_layers"], "--seed", seed],
        Path(out).parent / "train.log")


def island_error(model, images, labels, manifest: str) -> float:
    """Mean over classes of the total variation between the samples' islands (the router's argmax at a low sigma)
    and the data's islands of that class."""
    import torch

    from ddm.data.images import DigitsDataset
    from ddm.partition.manifest import Manifest

    data_labels, assignments = DigitsDataset().labels, Manifest.load(manifest).assignments
    k = model.config.num_experts
    with torch.no_grad():
        t = torch.full((len(images),), 1000 * ISLAND_SIGMA)
        named = model.router(images * 2 - 1, t, labels).argmax(1)
    errors = []
    for c in labels.unique().tolist():
        data = torch.bincount(assignments[data_labels == c], minlength=k).float()
        made = torch.bincount(named[labels == c], minlength=k).float()
        errors.append(0.5 * (data / data.sum() - made / made.sum()).abs().sum().item())
    return sum(errors) / len(errors)


def eval_job(name: str, router: str | None, experts: list[str], strategies: list, s: dict, seed: int, manifest: str) -> list[dict]:
    """FID/accuracy/proportion errors of one model under each (strategy, guidance routing), and the experts run."""
    import torch

    from ddm.data.images import DigitsDataset
    from evaluation.digit_classifier import load_digit_classifier
    from evaluation.images import digit_features, digits_reference, evaluate_samples
    from router.pipeline import ensemble_pipeline, load_pipeline

    classifier = load_digit_classifier()
    reference = digits_reference()
    data_share = torch.bincount(DigitsDataset().labels, minlength=10).float()
    data_share /= data_share.sum()
    labels = torch.arange(s["n_samples"]) % 10
    rows = []
    for strategy, guidance in strategies:
        pipe = load_pipeline(experts[0]) if router is None else ensemble_pipeline(router, experts, strategy)
        model = pipe.transformer
        images = pipe(labels, s["sample_steps"], s["cfg"], torch.Generator().manual_seed(seed), output_type="pt",
                      guidance_routing=guidance or GUIDANCE).images  # the monolith has no routing
        metrics = evaluate_samples(images, labels, reference, digit_features(classifier), classifier)
        runs = torch.stack(model.routing_weights).gt(0).sum(-1).float().mean().item() if router else 1.0
        class_error = 0.5 * (torch.tensor(metrics["predicted_class_fraction"]) - data_share).abs().sum().item()
        rows.append({"model": name, "strategy": strategy, "guidance": guidance if router else "", "seed": seed,
                     "fid": metrics["fid"], "accuracy": metrics["accuracy"], "class_coverage": metrics["class_coverage"],
                     "class_error": class_error, "island_error": island_error(model, images, labels, manifest) if router else None,
                     "experts_per_step": runs})
    return rows


def flop_budget(s: dict, ks: list[int]) -> dict:
    """Training FLOPs (3 x forward per sample) of each configuration, and the monolith's matching step count."""
    import torch

    from ddm.models.experts import build_dit
    from router.model import RouterModel, measured_flops

    expert = build_dit(s["preset"], 8, 1, 10)
    router = RouterModel(num_experts=max(ks), sample_size=8, in_channels=1, hidden_dim=s["router_width"], num_layers=s["router_layers"])
    x, t, y = torch.zeros(1, 1, 8, 8), torch.full((1,), 500.0), torch.zeros(1, dtype=torch.long)
    fe, fr = measured_flops(expert, x, t, y), measured_flops(router, x, t)
    experts_train = 3 * fe * s["steps"] * s["batch_size"]
    router_train = 3 * fr * s["router_steps"] * s["router_batch"]
    extra = math.ceil(router_train / (3 * fe * s["batch_size"]))
    return {
        "expert_forward_flops": fe, "router_forward_flops": fr, "router_over_expert_forward": fr / fe,
        "ddm_train_flops": experts_train + router_train, "ddm_router_share": router_train / (experts_train + router_train),
        "monolith_steps": s["steps"] + extra, "monolith_train_flops": 3 * fe * (s["steps"] + extra) * s["batch_size"],
    }


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["strategy"], r["guidance"]), []).append(r)
    out = []
    for (model, strategy, guidance), rs in groups.items():
        fids = [r["fid"] for r in rs]
        islands = [r["island_error"] for r in rs if r["island_error"] is not None]
        out.append({
            "model": model, "strategy": strategy, "guidance": guidance, "fid_per_seed": fids, "fid_mean": statistics.fmean(fids),
            "fid_std": statistics.stdev(fids) if len(fids) > 1 else 0.0,
            "accuracy_mean": statistics.fmean(r["accuracy"] for r in rs),
            "class_error_mean": statistics.fmean(r["class_error"] for r in rs),
            "island_error_mean": statistics.fmean(islands) if islands else None,
            "experts_per_step": statistics.fmean(r["experts_per_step"] for r in rs),
        })
    return out


def markdown(result: dict) -> str:
    s, f = result["settings"], result["flops"]
    lines = [
        f"### DDM vs monolith on the digits at equal training FLOPs ({result['date']})",
        "",
        f"Command: `{result['command']}` — wall time {result['wall_seconds'] / 60:.1f} min on {result['machine']}.",
        f"Experts: DiT `{s['preset']}`, {s['steps']} steps, global batch {s['batch_size']} split over the K experts; router "
        f"{f['router_over_expert_forward']:.1%} of an expert's forward FLOPs, {f['ddm_router_share']:.1%} of the DDM's training "
        f"FLOPs, given back to the monolith as {f['monolith_steps'] - s['steps']} extra steps. FID on the shipped digit "
        f"classifier's features vs the held-out 20% of the digits (359 images), {s['n_samples']} samples, {s['sample_steps']} "
        f"Euler steps, CFG {s['cfg']}, seeds {s['seeds']}; mean ± std over seeds. Guidance: how the two rows of a guided "
        f"sample are routed (conditional: both by the conditional row; per-row: each alone). Class error: total variation "
        f"between the class shares of the samples (digit classifier) and of the data. Island error: per class, total "
        f"variation between the samples' islands (the router's argmax at σ = {ISLAND_SIGMA}) and the data's, averaged over "
        f"classes. Experts run = mean experts evaluated per sample and step.",
        "",
        "| model | strategy | guidance | FID (ours) | accuracy | class error | island error | experts run | paper FID (ImageNet, K=8) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    paper = {name: fid for name, _, fid in PAPER_TABLE1}
    for r in result["results"]:
        ref = paper.get(r["strategy"] if r["model"] != "monolith" else "monolith") if r["model"] in ("monolith", "ddm-k8") else None
        if r["guidance"] == "per-row":
            ref = None  # the paper's rows are not split by guidance routing
        island = "" if r["island_error_mean"] is None else f"{r['island_error_mean']:.3f}"
        lines.append(
            f"| {r['model']} | {r['strategy']} | {r['guidance']} | {r['fid_mean']:.2f} ± {r['fid_std']:.2f} | {r['accuracy_mean']:.3f} | "
            f"{r['class_error_mean']:.3f} | {island} | {r['experts_per_step']:.2f} | {'' if ref is None else ref} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings for the tests (< 5 min)")
    p.add_argument("--work-dir", default=None, help="manifests, experts and routers (default outputs/reproduce_ddm[_quick])")
    p.add_argument("--json", default=None, help="results JSON (default docs/benchmarks/ddm_reproduce.json; quick: in --work-dir)")
    p.add_argument("--fragment", default=None, help="markdown fragment to update (default docs/RESULTS.md; quick: in --work-dir)")
    p.add_argument("--jobs", type=int, default=2, help="parallel worker processes (one thread each)")
    from ddm import run_reporting_usage_errors

    return run_reporting_usage_errors(run, p.parse_args(argv))


def run(args) -> int:
    from ddm import UsageError

    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    s = dict(QUICK if args.quick else FULL)
    work = Path(args.work_dir or ROOT / "outputs" / ("reproduce_ddm_quick" if args.quick else "reproduce_ddm"))
    json_path = Path(args.json or (work / "ddm_reproduce.json" if args.quick else ROOT / "docs/benchmarks/ddm_reproduce.json"))
    fragment = Path(args.fragment or (work / "ddm.md" if args.quick else ROOT / "docs/RESULTS.md"))
    if work.exists() and any(work.iterdir()):
        raise UsageError(f"--work-dir {work} is not empty; give a fresh one (runs are not resumed)")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    worker_init()

    partitions = {f"ddm-k{k}": (k, ["--balanced"]) for k in s["ks"]}
    partitions["ddm-k4-random"] = (4, ["--random"])
    for name, (k, method) in partitions.items():
        cli(["partition", "--k", k, "--out", work / name / "manifest", *method], work / "partition.log")
    flops = flop_budget(s, s["ks"])

    train, routers, evals = [], [], []
    for seed in s["seeds"]:
        mono = work / "monolith" / f"seed{seed}"
        train.append((str(work / "ddm-k4" / "manifest"), "all", str(mono), flops["monolith_steps"], s["batch_size"], s, seed))
        evals.append(("monolith", None, [str(mono)], [("monolith", "")], s, seed, ""))
        for name, (k, _) in partitions.items():
            manifest, experts = str(work / name / "manifest"), [str(work / name / f"seed{seed}" / f"island{i}") for i in range(k)]
            train += [(manifest, str(i), e, s["steps"], s["batch_size"] // k, s, seed) for i, e in enumerate(experts)]
            router = str(work / name / f"seed{seed}" / "router")
            routers.append((manifest, experts, router, s, seed))
            random_rows = [(st, GUIDANCE) for st in ("top1", "full", "trajectory")]
            evals.append((name, router, experts, STRATEGIES if name != "ddm-k4-random" else random_rows, s, seed, manifest))
    print(f"training {len(train)} experts/monoliths and {len(routers)} routers with {args.jobs} jobs ...", flush=True)
    with contextlib.ExitStack() as stack:  # one pool for all stages: workers import torch once
        pool = None
        if args.jobs > 1:
            import multiprocessing

            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(ProcessPoolExecutor(args.jobs, mp_context=context, initializer=worker_init))
        run_jobs(pool, train_job, train)
        run_jobs(pool, router_job, routers)
        print(f"sampling and scoring {len(evals)} models ...", flush=True)
        rows = [r for rs in run_jobs(pool, eval_job, evals) for r in rs]

    command = "python scripts/reproduce_ddm.py" + (" --quick" if args.quick else "") + (f" --jobs {args.jobs}" if args.jobs != 2 else "")
    result = {
        "command": command, "date": datetime.date.today().isoformat(), "mode": "quick" if args.quick else "full",
        "wall_seconds": time.perf_counter() - t0, "machine": f"{os.cpu_count()} CPU cores, {args.jobs} jobs x 1 thread",
        "settings": s, "flops": flops, "results": summarize(rows), "runs": rows,
        "paper_table1": [{"strategy": n, "gflops_per_step": g, "fid": f} for n, g, f in PAPER_TABLE1],
        "reference_set": "digits held-out 20% (seeded split, 359 images)",
    }
    from ddm.io import atomic_write_json
    from evaluation.report import update_fragment

    atomic_write_json(json_path, result)
    text = markdown(result)
    update_fragment(fragment, "reproduce", text)
    print(text)
    print(f"wrote {json_path} and {fragment}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
