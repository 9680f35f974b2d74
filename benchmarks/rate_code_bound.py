"""Benchmark: the rate-code resolution floor of post-training conversion — each zoo ANN with its activations
quantised to the T + 1 levels a T-step {0, 1} spike train can carry.

An IF neuron with reset by subtraction, threshold θ and initial membrane θ/2, fed a constant current z for T
steps, fires ``clip(floor(z·T/θ + 1/2), 0, T)`` spikes: its rate is ``q_T(z) = θ/T · clip(floor(z·T/θ + 1/2), 0,
T)``. An SNN whose every layer fired that evenly (no *unevenness* error: spikes of a layer arriving in an order
that makes the next layer fire early or late) computes exactly the ANN with every activation replaced by ``q_T``.
Its accuracy is what post-training conversion at T can reach with these weights and per-layer thresholds when
only the timing error is corrected (potential / bias calibration, offset spikes, signed spikes): the remaining
loss is resolution — T + 1 levels per neuron — which only retraining (QCFS, tandem) or more levels per step
(burst neurons) removes. It is a floor for the quantisation error, not a strict bound on every recipe: weight
calibration changes the weights, and per-channel rounding offsets are not searched here.

θ per layer, from the activation *inputs* on the calibration images (first 2,048 training images): ``max``,
``p99.99`` and ``mse@T`` per layer, ``max`` and ``mse@T`` per channel, and ``mse/bsnn`` (per channel only where
bsnn's converter allows it — every consumer full precision —, per layer elsewhere: the floor a binary SNN can
reach) (``mse``: the θ of a 64-point grid in [0.05, 1] × max minimising E[(q_T(z) − relu(z))²] on a
sample of 2^21 inputs, SNN Calibration's threshold search); trained-threshold activations (QCFS, clip) also get
their own λ. Accuracy on the full validation (5,000) and test (10,000) splits; the θ rule is chosen per T on
validation. Results are kept per network between runs. Usage::

    python benchmarks/rate_code_bound.py --threads 2 --networks cifar10_plain_bvgg
    python benchmarks/rate_code_bound.py --networks cifar10_airbench_binary_v2 --n-val 2000 --n-test 5000 \
        --rules p99.99,mse,mse/ch
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (Timer, command_line, log, machine_info, machine_markdown, markdown_table,  # noqa: E402
                     now_iso, write_results)
from _zoo import available, first, load_network  # noqa: E402

from bsnn.activations import is_trained_threshold  # noqa: E402
from bsnn.convert.graph import capture, per_channel_allowed, relu_modules  # noqa: E402
from bsnn.convert.snn_calibration import quantised_count  # noqa: E402

NAME = "rate_code_bound"
NETWORKS = ["cifar10_plain_bvgg", "cifar10_airbench_binary_v2", "cifar10_airbench_qcfs_v2"]
GRID = [1, 2, 4, 8, 16, 32, 64]
RULES = ["max", "p99.99", "mse", "max/ch", "mse/ch", "mse/bsnn", "trained"]
SAMPLE = 1 << 21  # activation inputs kept per layer for the percentile and MSE searches


def activations(model: nn.Module) -> dict[str, nn.Module]:
    """The spiking nonlinearities of ``model`` (ReLU modules and trained-threshold activations), by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.ReLU) or is_trained_threshold(m)}


def quantise(z: torch.Tensor, theta: float | torch.Tensor, timesteps: int) -> torch.Tensor:
    """``q_T(z)``: the rate of an evenly firing IF neuron (θ, v0 = θ/2) fed ``z`` for T steps; ``z [B, C, ...]``
    with θ a float or per channel ``[C]``, or ``z [C, n]`` with θ ``[C, 1]``."""
    if isinstance(theta, torch.Tensor) and theta.dim() == 1:
        theta = theta.reshape(-1, *([1] * (z.dim() - 2)))
    theta = torch.as_tensor(theta, dtype=z.dtype)
    return quantised_count(z, theta, timesteps, 0.5) * (theta / timesteps)


def collect_inputs(model: nn.Module, loader, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per activation: (a random sample of its inputs per channel ``[C, n]``, ``n·C <= SAMPLE``; their exact
    per-channel max ``[C]``)."""
    acts, seen = activations(model), {}
    gen = torch.Generator().manual_seed(seed)

    def hook(name):
        def f(_m, inp, _out):
            z = inp[0].detach().float()
            z = z.transpose(0, 1).reshape(z.shape[1], -1)  # [C, B * H * W]
            keep = z[:, torch.randint(z.shape[1], (min(z.shape[1], SAMPLE // 8 // z.shape[0]),), generator=gen)]
            s, mx = seen.get(name, ([], None))
            s.append(keep)
            seen[name] = (s, z.amax(1) if mx is None else torch.maximum(mx, z.amax(1)))
        return f

    handles = [m.register_forward_hook(hook(n)) for n, m in acts.items()]
    try:
        with torch.no_grad():
            for x, _ in loader:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: (torch.cat(s, 1), mx) for n, (s, mx) in seen.items()}


def mse_threshold(z: torch.Tensor, z_max: torch.Tensor, timesteps: int) -> torch.Tensor:
    """Per row of ``z [C, n]``: the θ of a 64-point grid in [0.05, 1]·``z_max [C]`` minimising the mean squared
    error of ``q_T`` against ReLU -> ``[C]`` (rows that never turn positive keep ``z_max``)."""
    target = torch.relu(z)
    grid = torch.linspace(0.05, 1.0, 64)[:, None] * z_max.clamp_min(1e-6)[None]  # [64, C]
    errs = torch.stack([((quantise(z, t[:, None], timesteps) - target) ** 2).mean(1) for t in grid])  # [64, C]
    return grid.gather(0, errs.argmin(0)[None])[0]


def thresholds(model: nn.Module, stats: dict, rule: str, timesteps: int, allowed: set[str] = frozenset()
               ) -> dict[str, object] | None:
    """θ per activation for ``rule`` (``max`` / ``p99.99`` / ``mse``, per layer; ``max/ch`` / ``mse/ch``, per
    channel; ``mse/bsnn``: per channel on the activations in ``allowed``, per layer elsewhere — what bsnn's
    converter can build; ``trained``: the activation's λ), None if it does not apply to this network."""
    acts = activations(model)
    if rule == "trained":
        if not all(is_trained_threshold(m) for m in acts.values()):
            return None
        return {n: float(m.clip) for n, m in acts.items()}
    out = {}
    for n, (z, mx) in stats.items():
        if rule == "max":
            out[n] = float(mx.max())
        elif rule == "max/ch":
            out[n] = mx.clamp_min(1e-6)
        elif rule == "p99.99":
            pos = z[z > 0]
            out[n] = float(torch.quantile(pos[:1 << 24], 0.9999)) if pos.numel() else float(mx.max())
        elif rule == "mse" or (rule == "mse/bsnn" and n not in allowed):
            out[n] = float(mse_threshold(z.reshape(1, -1), mx.max().reshape(1), timesteps)[0])
        else:
            out[n] = mse_threshold(z, mx, timesteps)
    return out


def accuracy(model: nn.Module, data, theta: dict[str, float] | None, timesteps: int | None) -> float:
    """Top-1 (%) of ``model`` on ``data`` with every activation replaced by ``q_T`` (``theta`` None: the ANN)."""
    acts = activations(model)
    handles = [] if theta is None else [
        m.register_forward_hook(lambda _m, inp, _o, th=theta[n]: quantise(inp[0], th, timesteps))
        for n, m in acts.items()]
    correct = total = 0
    try:
        with torch.no_grad():
            for x, y in data:
                correct += int((model(x).argmax(1) == y).sum())
                total += y.numel()
    finally:
        for h in handles:
            h.remove()
    return 100.0 * correct / total


def bsnn_per_channel(model: nn.Module, example: torch.Tensor) -> set[str]:
    """The activations bsnn's converter gives per-channel thresholds (``per_channel_allowed``: every consumer full
    precision; a ±1 consumer keeps the layer layer-wise)."""
    gm = capture(model, example)
    relus = relu_modules(gm)
    if set(relus) != set(activations(model)):
        raise SystemExit(f"captured activations {sorted(relus)} differ from the model's {sorted(activations(model))}")
    return per_channel_allowed(gm, set(relus))


def measure(name: str, n_val: int, n_test: int, rules: list[str], previous: dict | None = None) -> dict:
    """Rows of ``rules`` on the network ``name`` (``previous``'s rows of other rules are kept: same images only)."""
    t0 = time.perf_counter()
    net = load_network(name)
    model = net.model
    val, test = first(net.val, n_val, 500), first(net.test, n_test, 500)
    if previous and (previous["n_val"], previous["n_test"]) != (len(val.dataset), len(test.dataset)):
        raise SystemExit(f"{name}: the results file holds rows on {previous['n_val']} / {previous['n_test']} images; "
                         f"re-run with --n-val {previous['n_val']} --n-test {previous['n_test']}")
    with Timer() as t:
        stats = collect_inputs(model, net.calib)
    log(f"{name}: {len(stats)} activations, inputs collected in {t.s:.0f} s")
    allowed = bsnn_per_channel(model, next(iter(net.calib))[0][:2])
    res = {"network": name, "data": net.data_note, "n_val": len(val.dataset), "n_test": len(test.dataset),
           "seconds": 0.0, "ann": {"val": accuracy(model, val, None, None),
                                                          "test": accuracy(model, test, None, None)},
           "rows": [r for r in (previous or {}).get("rows", []) if r["rule"] not in rules]}
    for rule in rules:
        for steps in GRID:
            th = thresholds(model, stats, rule, steps, allowed)
            if th is None:  # no trained thresholds in this network
                break
            row = {"rule": rule, "T": steps, "val": accuracy(model, val, th, steps),
                   "test": accuracy(model, test, th, steps)}
            res["rows"].append(row)
            log(f"{name} {rule} T={steps}: val {row['val']:.2f} test {row['test']:.2f}")
    best = {}
    for steps in GRID:  # the rule with the best validation accuracy at each T, among those a binary SNN can build
        cands = [r for r in res["rows"] if r["T"] == steps and not r["rule"].endswith("/ch")]
        best[steps] = max(cands, key=lambda r: r["val"])
    res["best"] = {str(k): v for k, v in best.items()}
    res["best_t1_val"] = next((s for s in GRID if best[s]["val"] >= res["ann"]["val"] - 1), None)
    res["best_t1_test"] = next((s for s in GRID if best[s]["test"] >= res["ann"]["test"] - 1), None)
    res["seconds"] = round(time.perf_counter() - t0 + (previous or {}).get("seconds", 0.0), 1)
    return res


def markdown(results: list[dict], info: dict, commands: list[str]) -> str:
    lines = ["# Rate-code resolution floor: the ANN with activations quantised to T + 1 levels", "",
             machine_markdown(info), "", "Commands (networks are kept between runs; each was measured by one of "
             "these): " + "; ".join(f"`{c}`" for c in commands) + f" (last run {now_iso()}).", "",
             results[0]["data"] if results else "", "",
             "Accuracy (%) on the first n validation / test images of each network's own splits (n per network "
             "below). "
             "Each activation is replaced by q_T(z) = θ/T·clip(floor(zT/θ + 1/2), 0, T): the rate of an IF neuron "
             "(θ, v0 = θ/2) that fires perfectly evenly for T steps — the SNN without unevenness error (module "
             "docstring). θ: max / p99.99 / MSE-optimal for that T on the calibration images, per layer, per "
             "channel (/ch), per channel where bsnn's converter allows it (every consumer full precision) and per "
             "layer elsewhere (/bsnn: what a binary SNN can build), or the trained λ (QCFS). 'best' = the rule "
             "with the best validation accuracy at that T among those a binary SNN can build (not /ch); T@1 = smallest T with the best rule within 1 point of the ANN.", ""]
    for r in results:
        lines += [f"## {r['network']}", "",
                  f"{r['n_val']} validation / {r['n_test']} test images, {r['seconds']:.0f} s. "
                  f"ANN: validation {r['ann']['val']:.2f} %, test {r['ann']['test']:.2f} %. Best rule within 1 point "
                  f"of the ANN from T = {r['best_t1_val']} on validation, T = {r['best_t1_test']} on test.", ""]
        rules = list(dict.fromkeys(x["rule"] for x in r["rows"]))
        rows = []
        for rule in rules:
            for split in ("val", "test"):
                rows.append([rule, split] + [next((x[split] for x in r["rows"] if x["rule"] == rule and x["T"] == s),
                                                  None) for s in GRID])
        rows.append(["best buildable (chosen on val)", "test"] + [r["best"][str(s)]["test"] for s in GRID])
        lines += [markdown_table(["θ rule", "split"] + [f"T={s}" for s in GRID], rows), ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--networks", default=",".join(NETWORKS))
    p.add_argument("--n-val", type=int, default=5000)
    p.add_argument("--n-test", type=int, default=10000)
    p.add_argument("--rules", default="p99.99,mse,max/ch,mse/ch,mse/bsnn,trained",
                   help=f"comma-separated θ rules among {','.join(RULES)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    if not available():
        print("CIFAR-10 (../shared/data/cifar10.npz) is absent: nothing to measure")
        return
    torch.set_num_threads(a.threads)
    info = machine_info(extra_packages=())
    rules = [r for r in a.rules.split(",") if r]
    if set(rules) - set(RULES):
        p.error(f"unknown --rules {sorted(set(rules) - set(RULES))}: choose among {', '.join(RULES)}")
    old = Path(a.out) / f"{NAME}.json"
    saved = json.loads(old.read_text()) if old.is_file() else {}
    results = {r["network"]: r for r in saved.get("results", [])}
    commands = [c for c in saved.get("commands", []) if c != command_line()] + [command_line()]
    for n in [n for n in a.networks.split(",") if n]:  # written after each network: a long run keeps its part
        results[n] = measure(n, a.n_val, a.n_test, rules, results.get(n))
        ordered = [results[k] for k in NETWORKS if k in results] + [v for k, v in results.items() if k not in NETWORKS]
        paths = write_results(a.out, NAME, {"machine": info, "commands": commands, "results": ordered},
                              markdown(ordered, info, commands))
        print(f"wrote {paths['md']}")


if __name__ == "__main__":
    main()
