"""Turn benchmark results (the JSON dict) into terminal tables, markdown, comparisons and plots."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

REGRESSION = 1.10  # new/old time ratio above which --compare flags a regression
LEGEND = (
    "vs torch / vs numpy: ratio of epoch times (< 1 is faster). GFLOP/s: matmul FLOPs of the epoch / "
    "median time. × GEMM bound: median time / (matmul FLOPs / GEMM peak measured in this run). "
    "× floor: median time / median time of the same epoch's matmuls alone (real batch shapes, "
    "preallocated outputs, nothing else) on the backend's device, one floor epoch after each of the "
    "backend's epochs, so that a machine whose speed drifts gives both the same slow minutes: "
    "everything above 1.00 is overhead. "
    "JIT s: one-time compile (or cache load), not in the epoch times."
)


def _fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence], markdown: bool = False) -> str:
    """Rows of already formatted cells -> an aligned text table or a markdown table."""
    rows = [[str(c) for c in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "-" * len(line)]
    out += [
        "  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in rows
    ]
    return "\n".join(out)


def machine_line(res: dict) -> str:
    """One line: CPU, cores, BLAS, GPU, measured peaks."""
    m, lines = res["machine"], []
    blas = m.get("blas", {}).get("name", "?")
    gpu = m.get("gpu") or "no GPU"
    lines.append(f"{m['cpu_model']} ({m['cores']} cores), BLAS {blas}, {gpu}, dtype {res['dtype']}")
    for dev, p in res["peaks"].items():
        gemm, copy = f"{p['gemm_gflops']:.1f}", f"{p['copy_gbs']:.1f}"
        cached = f", cached copy {p['copy_cached_gbs']:.1f} GB/s" if "copy_cached_gbs" in p else ""
        lines.append(f"{dev} peaks measured in this run: GEMM {gemm} GFLOP/s, copy {copy} GB/s{cached}")
    env = {k: v for k, v in m.get("env", {}).items() if v is not None}
    if env:
        lines.append("env: " + " ".join(f"{k}={v}" for k, v in env.items()))
    load = m.get("loadavg", {})
    if "start" in load:
        lines.append(
            f"1-min load average at start {load['start']:.2f}, end {load.get('end', float('nan')):.2f}"
        )
    return "\n".join(lines)


def epochs_table(res: dict, markdown: bool = False) -> str:
    """The headline table: epoch seconds per config and backend with ratios and GEMM-bound columns."""
    headers = [
        "config",
        "backend",
        "epoch s (median)",
        "min–max",
        "vs torch",
        "vs numpy",
        "GFLOP/s",
        "% GEMM peak",
        "× GEMM bound",
        "× floor",
        "JIT s",
    ]
    jit = res.get("jit_seconds", {})
    rows = []
    for e in res["epochs"]:
        cfg = res["configs"][e["config"]]
        label = f"{e['config']} {cfg['spec']} {cfg['act']} {cfg['optimizer']} b{cfg['batch_size']}"
        rows.append(
            [
                label,
                e["backend"],
                f"{e['median']:.3f}",
                f"{e['min']:.3f}–{e['max']:.3f}",
                _fmt(e.get("vs_torch"), ".2f"),
                _fmt(e.get("vs_numpy"), ".2f"),
                f"{e['gflops']:.1f}",
                f"{e['pct_gemm_peak']:.0f}%",
                f"{e['x_gemm_bound']:.2f}",
                _fmt(e.get("x_floor"), ".2f"),
                _fmt(jit.get(e["backend"]), ".2f"),
            ]
        )
    return table(headers, rows, markdown)


def _recipe(tta: dict) -> str:
    """The time-to-accuracy recipe in words (older results name only the spec)."""
    r = tta.get("recipe")
    if r is None:
        return tta["spec"]
    decay = f" ×{r['lr_gamma']:g}/epoch" if r.get("lr_gamma", 1) != 1 else ""
    return f"{r['spec']} {r['act']} {r['optimizer']} lr {r['lr']:g}{decay} b{r['batch_size']}"


def kernels_table(res: dict, markdown: bool = False) -> str:
    """Roofline table: per-kernel µs/call, GB/s or GFLOP/s and % of the measured peak."""
    headers = [
        "backend",
        "kernel",
        "variant",
        "shape",
        "µs/call",
        "GB/s",
        "GFLOP/s",
        "% peak",
        "% cached copy",
        "images/s",
    ]
    rows = [
        [
            r["backend"],
            r["kernel"],
            r["variant"],
            "x".join(map(str, r["shape"])),
            f"{1e6 * r['seconds']:.1f}",
            _fmt(r.get("gbs"), ".1f"),
            _fmt(r.get("gflops"), ".1f"),
            f"{r['pct_peak']:.0f}%",
            f"{r['pct_cached_copy']:.0f}%" if "pct_cached_copy" in r else "–",
            _fmt(r.get("images_per_s"), ".3g"),
        ]
        for r in res.get("kernels", [])
    ]
    return table(headers, rows, markdown)


def sweep_table(res: dict, kind: str, markdown: bool = False) -> str:
    """Epoch seconds (GFLOP/s) per sweep point (rows) and backend (columns)."""
    pts = [p for p in res.get("sweep", []) if p["kind"] == kind]
    backends = list(dict.fromkeys(p["backend"] for p in pts))
    xs = sorted({p["x"] for p in pts})
    by = {(p["x"], p["backend"]): p for p in pts}
    rows = []
    for x in xs:
        cells = [str(x)]
        for b in backends:
            p = by.get((x, b))
            cells.append(f"{p['seconds']:.3f} ({p['gflops']:.0f})" if p else "–")
        rows.append(cells)
    label = "hidden width" if kind == "width" else "batch size"
    return table([label] + [f"{b} s (GFLOP/s)" for b in backends], rows, markdown)


def tta_table(res: dict, markdown: bool = False) -> str:
    """Seconds and epochs to each test-accuracy target, per backend."""
    rows = []
    targets = sorted(
        {k.split("_to_")[1] for t in res.get("tta", []) for k in t if k.startswith("seconds_to_")}
    )
    for t in res.get("tta", []):
        jit = res.get("jit_seconds", {}).get(t["backend"], t.get("jit_seconds"))  # the first, one-time JIT
        cells = [t["backend"], _fmt(jit, ".2f")]
        for tg in targets:
            s, ep = t.get(f"seconds_to_{tg}"), t.get(f"epochs_to_{tg}")
            cells.append(f"{s:.1f} s ({ep} ep)" if s is not None else "not reached")
        cells.append(f"{100 * t['best_test_acc']:.2f}%")
        rows.append(cells)
    headers = ["backend", "JIT s"] + [f"to {100 * float(tg):g}%" for tg in targets] + ["best test acc"]
    return table(headers, rows, markdown)


INFERENCE_LEGEND = (
    "images/s: batch / best seconds per call over interleaved rounds, warm-up excluded, host NumPy batch "
    "in and out. ×ORT / ×torch: the gpumlp backend's images/s over ONNX Runtime's / PyTorch's for the "
    "same model, batch and op (> 1 is faster). × floor: seconds per call over the model's matmuls alone "
    "at that batch (numpy.matmul, preallocated outputs), measured in the same rounds."
)


def inference_table(res: dict, markdown: bool = False) -> str:
    """Images/s per (model, batch, op): every runner, the floor, and each gpumlp backend's ratios."""
    rows = res.get("inference", [])
    runners = list(dict.fromkeys(r["runner"] for r in rows if r["op"] != "matmuls"))
    ours = [r for r in runners if r not in ("torch", "onnxruntime")]
    peers = [p for p in ("onnxruntime", "torch") if p in runners]
    by = {(r["model"], r["batch"], r["op"], r["runner"]): r for r in rows}
    short = {"onnxruntime": "ORT", "torch": "torch"}
    headers = ["model", "batch", "op"] + [f"{r} img/s" for r in runners] + ["floor img/s"]
    headers += [f"{g} ×{short[p]}" for g in ours for p in peers] + [f"{g} × floor" for g in ours]
    table_rows = []
    for key in dict.fromkeys((r["model"], r["batch"], r["op"]) for r in rows if r["op"] != "matmuls"):
        cells = {runner: by.get((*key, runner)) for runner in runners}
        floor = by.get((*key[:2], "matmuls", "matmul floor"))
        line = [f"{key[0]} {cells[runners[0]]['spec']}", str(key[1]), key[2]]
        line += [_fmt(c["images_per_s"], ".3g") if (c := cells[r]) else "–" for r in runners]
        line.append(_fmt(floor["images_per_s"], ".3g") if floor else "–")
        line += [_fmt((cells[g] or {}).get(f"vs_{p}"), ".2f") for g in ours for p in peers]
        line += [_fmt((cells[g] or {}).get("x_floor"), ".2f") for g in ours]
        table_rows.append(line)
    return table(headers, table_rows, markdown)


def inference_legend(res: dict) -> str:
    """What the inference table's columns mean, the peers' setup and the gpumlp backends' paths."""
    peers = res.get("inference_peers", {})
    parts = [f"{name} {p['version']} " + ", ".join(f"{k}={v}" for k, v in p.items() if k != "version")
             for name, p in peers.items()]  # fmt: skip
    paths = {}
    for r in res.get("inference", []):
        if "inference_path" in r:
            paths.setdefault((r["runner"], r["inference_path"]), {})[r["model"]] = None
    used = [f"{runner}: {path} on {', '.join(models)}" for (runner, path), models in paths.items()]
    tail = ". gpumlp inference paths: " + "; ".join(used) if used else ""
    return INFERENCE_LEGEND + " peers: " + ("; ".join(parts) if parts else "none") + tail


def render(res: dict, markdown: bool = False) -> str:
    """Every section present in ``res`` as text (or markdown)."""
    h = "### " if markdown else "== "
    parts = [machine_line(res).replace("\n", "  \n" if markdown else "\n")]
    if res.get("quick"):
        parts.append("(--quick: a fraction of an epoch, scaled to 55,000 samples; indicative only)")
    if res["epochs"]:
        parts += [
            f"{h}Epoch time (55,000 MNIST samples, warm-up excluded)",
            epochs_table(res, markdown),
            LEGEND,
        ]
    if res.get("skipped"):
        parts.append("skipped: " + "; ".join(f"{k}: {v}" for k, v in res["skipped"].items()))
    if res.get("kernels"):
        parts += [
            f"{h}Kernels (best of repeats; % of the measured GEMM or copy peak)",
            kernels_table(res, markdown),
        ]
    for kind in ("width", "batch"):
        if any(p["kind"] == kind for p in res.get("sweep", [])):
            parts += [f"{h}Sweep: epoch seconds vs {kind}", sweep_table(res, kind, markdown)]
    if res.get("tta"):
        parts += [
            f"{h}Time to test accuracy ({_recipe(res['tta'][0])}; train time, eval excluded)",
            tta_table(res, markdown),
        ]
    if res.get("inference"):
        parts += [
            f"{h}Inference throughput (MNIST test images; predict: class ids, predict_proba: probabilities)",
            inference_table(res, markdown),
            inference_legend(res),
        ]
    return "\n\n".join(parts) + "\n"


def headline_markdown(res: dict) -> str:
    """The README table: machine line + epoch table in markdown."""
    note = machine_line(res).replace("\n", "  \n")
    return f"{note}\n\n{epochs_table(res, markdown=True)}\n\n{LEGEND}\n"


# ------------------------------------------------------------------- compare
def _timings(res: dict) -> dict[str, float]:
    """Flat {entry key: seconds} over every timed entry of a results dict."""
    out = {}
    for e in res.get("epochs", []):
        out[f"epoch {e['config']} {e['backend']} {e['dtype']}"] = e["median"]
    for r in res.get("kernels", []):
        shape = "x".join(map(str, r["shape"]))
        out[f"kernel {r['backend']} {r['kernel']} {r['variant']} {shape} {r['dtype']}"] = r["seconds"]
    for p in res.get("sweep", []):
        out[f"sweep {p['kind']}={p['x']} {p['backend']}"] = p["seconds"]
    for r in res.get("inference", []):
        out[f"inference {r['model']} b{r['batch']} {r['op']} {r['runner']} {r['dtype']}"] = r["seconds"]
    for t in res.get("tta", []):
        for k, v in t.items():
            if k.startswith("seconds_to_") and v is not None:
                out[f"tta {t['backend']} {k[11:]}"] = v
    return out


def compare(new: dict, old: dict, threshold: float = REGRESSION) -> tuple[str, int]:
    """Per-entry new/old time ratios; -> (table text, number of regressions above threshold)."""
    a, b = _timings(new), _timings(old)
    rows, bad = [], 0
    for key in a:
        if key not in b or not b[key] > 0:
            continue
        ratio = a[key] / b[key]
        flag = "REGRESSION" if ratio > threshold else ("faster" if ratio < 1 / threshold else "")
        bad += flag == "REGRESSION"
        rows.append([key, f"{b[key]:.4g}", f"{a[key]:.4g}", f"{ratio:.2f}", flag])
    text = table(["entry", "old s", "new s", "new/old", ""], rows)
    missing = sorted(set(b) - set(a))
    if missing:
        text += f"\n(in old only, not compared: {len(missing)} entries)"
    return text + f"\n{bad} regression(s) above {100 * (threshold - 1):.0f}%", bad


# --------------------------------------------------------------------- plots
def plot(res: dict, out_dir: str | Path) -> list[Path]:
    """Write PNGs (epoch time, sweeps, tta) into out_dir; -> paths written."""
    from gpumlp.plots import pyplot

    plt = pyplot()  # a one-line ImportError naming the plot extra when matplotlib is missing
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    configs = list(dict.fromkeys(e["config"] for e in res["epochs"]))
    backends = list(dict.fromkeys(e["backend"] for e in res["epochs"]))
    if configs:
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / max(1, len(backends))
        for j, b in enumerate(backends):
            es = {e["config"]: e for e in res["epochs"] if e["backend"] == b}
            xs = [i + j * width for i, c in enumerate(configs) if c in es]
            med = [es[c]["median"] for c in configs if c in es]
            err = [[es[c]["median"] - es[c]["min"] for c in configs if c in es],
                   [es[c]["max"] - es[c]["median"] for c in configs if c in es]]  # fmt: skip
            ax.bar(xs, med, width, yerr=err, label=b)
        ax.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(configs))], configs)
        ax.set_ylabel("seconds per epoch (median, min–max)")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title("Epoch time, 55k MNIST samples")
        written.append(_save(fig, out / "epoch_time.png"))

    for kind in ("width", "batch"):
        pts = [p for p in res.get("sweep", []) if p["kind"] == kind]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for b in dict.fromkeys(p["backend"] for p in pts):
            ps = sorted((p for p in pts if p["backend"] == b), key=lambda p: p["x"])
            ax.plot([p["x"] for p in ps], [p["seconds"] for p in ps], "o-", label=b)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("hidden width (784-W-10, batch 256)" if kind == "width" else "batch size (784-256-10)")
        ax.set_ylabel("seconds per epoch")
        ax.legend()
        written.append(_save(fig, out / f"sweep_{kind}.png"))

    if res.get("tta"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for t in res["tta"]:
            ax.plot([c["train_seconds"] for c in t["curve"]], [c["test_acc"] for c in t["curve"]], "o-",
                    label=t["backend"])  # fmt: skip
        for tg in (0.975, 0.98):
            ax.axhline(tg, color="grey", lw=0.5, ls="--")
        ax.set_xlabel("training seconds (eval excluded)")
        ax.set_ylabel("MNIST test accuracy")
        ax.legend()
        written.append(_save(fig, out / "tta.png"))
    return written


def _save(fig, path: Path) -> Path:
    from gpumlp.plots import save_png

    fig.tight_layout()
    return save_png(fig, path)


def all_numbers_finite(obj) -> bool:
    """True when every float anywhere in obj is finite (JSON-safety check)."""
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(all_numbers_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(all_numbers_finite(v) for v in obj)
    return True
