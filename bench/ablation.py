"""The ablation table on the demo data (issues 21 and 22): rows of config overrides x seeds x report modes.

  python bench/ablation.py --out=/tmp/fvlm_ablation                      # the issue's 7 rows, 3 seeds, both modes
  python bench/ablation.py --out=/tmp/fvlm_ablation --rows=recipe        # project recipe, one public switch each
  python bench/ablation.py --out=/tmp/fvlm_ablation --dry_run            # the commands, nothing run
  python bench/ablation.py --out=/tmp/fvlm_ablation --table_only         # the table of the runs done so far

A row is a named list of config overrides; a run is (mode, row, seed). Each run trains one method (fvlm, or clip for
the CLIP row) for --steps steps through `python run.py --mode=train` and evaluates it with `--mode=eval` (checkpoint
chosen on the valid split, mean zero-shot AUC on the test split), in <out>/runs/<mode>/<row>/seed<k>/, whose
records/ is a link to records prepared once per mode and preparation (<out>/prep/): `seed` changes the model's
initialisation, the training order and flips (and dropout); the demo data stay those of --data_seed for every seed.
Modes: "free" is the demo's reports as they are, "templates" its template mode (data.demo_templates: every normal
anatomy is the one sentence "<Anatomy> shows no significant abnormalities.", so most texts of a batch are
identical). Rows whose overrides touch prep.*, data.*, model.text.init or recipe get their own preparation (images
from the mode's cache, so only texts, tokenizer and records are redone).

The "bert" row imports a small BERT (hidden 64, 2 layers, 4 heads, MLP 256: the demo text encoder's sizes, BERT's
post-LN architecture) trained here by masked language modelling on the mode's training reports only (PyTorch +
transformers on the CPU, seeded; one BERT per mode, shared by the seeds) through model.text.init: config.json,
model.safetensors and vocab.txt (a WordPiece vocabulary trained on the same reports).

Resumable: a run with summary.json and the same overrides in run.json is skipped; an interrupted training resumes
from its last checkpoint. Results: <out>/results.csv (mode, row, seed, mean AUC, per-task AUC, seconds) and
<out>/table.md, per mode and row: the mean over seeds, the standard deviation (ddof 1), min and max, the 95 %
t-interval of the mean, and the paired difference to the project recipe's row ("disease") with its t-interval.
docs/benchmarks.md ("Ablation") gives the budget arithmetic.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import recipes  # noqa: E402

MODES = {"free": False, "templates": True}  # mode -> data.demo_templates
BERT_FOLDER = "{bert}"  # in a row's overrides: the mode's trained BERT folder
CORRECTIONS = ("loss.normal_pairs", "loss.same_text_pairs", "loss.disease_pairs")


def _corrections(*on):
    return {k: k in on for k in CORRECTIONS}


# The issue's rows: id -> (label, overrides). "coteach" and "bert" each add one thing to "disease" (the project
# recipe), so that both are measured against the same row.
ISSUE_ROWS = {
    "clip": ("CLIP (whole volume, whole report)", {"train.methods": ("clip",)}),
    "fine": ("fine-grained, no corrections", _corrections()),
    "normal": ("+ normal correction", _corrections("loss.normal_pairs")),
    "same_text": ("+ same-text", _corrections("loss.normal_pairs", "loss.same_text_pairs")),
    "disease": ("+ disease pairing (project recipe)", _corrections(*CORRECTIONS)),
    "coteach": ("+ co-teaching", {**_corrections(*CORRECTIONS), "loss.coteach": True}),
    "bert": ("+ pretrained text encoder (BERT trained on the demo reports)",
             {**_corrections(*CORRECTIONS), "model.text.init": BERT_FOLDER, "model.text.anatomy_len": "p95"}),
}
BASELINE = "disease"


def load_config(spec: str):
    """configs/<file>.py[:variant] -> its get_config(variant)."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("ablation_config", ROOT / path if not os.path.isabs(path)
                                                         else path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def config_value(cfg, key: str):
    """The value of a dotted key, or KeyError when the config has no such key."""
    for part in key.split("."):
        if part not in cfg:
            raise KeyError(key)
        cfg = cfg[part]
    return cfg


def recipe_rows(cfg) -> tuple[dict, list[str]]:
    """(rows, notes) for issue 21: the project recipe with one switch of configs/recipes.py REFERENCE set to the
    public value ("public:<key>"), one row per switch whose public value differs from cfg's, and "reference" (the
    whole public recipe, `recipe=reference`, the heart's extra class included)."""
    rows, notes = {}, []
    for key, value in recipes.REFERENCE.items():
        if config_value(cfg, key) == value:
            notes.append(f"public:{key}: the project recipe has the public value {value!r} already (no row)")
        else:
            rows[f"public:{key}"] = (f"project, {key}={value!r}", {key: value})
    rows["reference"] = ("the public recipe (recipe=reference)", {"recipe": "reference"})
    return rows, notes


def select_rows(spec: str, cfg) -> tuple[dict, list[str]]:
    """--rows: "issue", "recipe", "all" or row ids separated by commas -> ({id: (label, overrides)}, notes). A row
    with a key the config does not have (co-teaching before its code exists) is left out, with a note."""
    recipe, recipe_notes = recipe_rows(cfg)
    known = {**ISSUE_ROWS, **recipe}
    groups = {"issue": list(ISSUE_ROWS), "recipe": list(recipe), "all": list(known)}
    parts = [part.strip() for part in spec.split(",")]
    ids = [row for part in parts for row in groups.get(part, [part])]
    notes = recipe_notes if {"recipe", "all"} & set(parts) else []
    rows = {}
    for row in dict.fromkeys(ids):
        if row not in known:
            raise SystemExit(f"--rows: unknown row {row!r}; known: {', '.join(known)}")
        missing = [k for k in known[row][1] if k != "recipe" and not _has(cfg, k)]
        if missing:
            notes.append(f"row {row!r} skipped: the config has no key {', '.join(missing)} (not in this code yet)")
            continue
        rows[row] = known[row]
    return rows, notes


def _has(cfg, key):
    try:
        config_value(cfg, key)
        return True
    except KeyError:
        return False


def budget(steps: int) -> dict:
    """The per-run budget's overrides: steps, two checkpoints (the middle and the end; evaluation picks one on the
    valid split), the demo's warm-up share (50 of 700 steps)."""
    return {"train.steps": steps, "train.checkpoint_every": max(1, steps // 2), "train.warmup_steps": steps // 14,
            "train.log_every": max(1, min(25, steps // 4))}


def flag(key: str, value) -> str:
    """One run.py override, --config.<key>=<value> (tuples as Python literals, as ml_collections parses them)."""
    return f"--config.{key}={value!r}" if isinstance(value, tuple) else f"--config.{key}={value}"


PREP_PREFIXES = ("prep.", "data.")
PREP_KEYS = ("model.text.init", "recipe")


def prep_overrides(overrides: dict) -> dict:
    """The overrides that change the prepared records (texts, tokenizer, images)."""
    return {k: v for k, v in overrides.items() if k.startswith(PREP_PREFIXES) or k in PREP_KEYS}


@dataclasses.dataclass
class Prep:
    name: str  # folder under <out>/prep
    mode: str
    overrides: dict  # prep_overrides of the rows that use it (BERT_FOLDER not yet filled in)


@dataclasses.dataclass
class Run:
    mode: str
    row: str
    seed: int
    prep: str
    overrides: dict  # everything given to run.py, seed and budget included

    @property
    def name(self) -> str:
        return f"{self.mode}/{self.row.replace(':', '_')}/seed{self.seed}"


def plan(rows: dict, seeds: list[int], modes: list[str], steps: int) -> tuple[list[Prep], list[Run]]:
    preps, runs = {}, []
    for mode in modes:
        preps[mode] = Prep(mode, mode, {})
        for row, (_, overrides) in rows.items():
            po = prep_overrides(overrides)
            name = mode
            if po:
                name = f"{mode}-" + hashlib.sha256(json.dumps(po, sort_keys=True).encode()).hexdigest()[:8]
                preps.setdefault(name, Prep(name, mode, po))
            for seed in seeds:
                full = {"seed": seed, "data.demo_templates": MODES[mode], "train.methods": ("fvlm",), **budget(steps),
                        **overrides}
                runs.append(Run(mode, row, seed, name, full))
    return list(preps.values()), runs


def fill(overrides: dict, out: Path, mode: str) -> dict:
    return {k: str(out / "bert" / mode) if v == BERT_FOLDER else v for k, v in overrides.items()}


# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------
def seed_stats(values, confidence: float = 0.95) -> dict:
    """Statistics of one row over its seeds: n, mean, std (ddof 1), min, max and the two-sided t-interval of the
    mean (mean +- t_{(1+confidence)/2, n-1} * std / sqrt(n)); std and the interval are nan for fewer than 2 seeds."""
    x = np.asarray(values, float)
    n = len(x)
    mean = float(x.mean()) if n else float("nan")
    std = float(x.std(ddof=1)) if n > 1 else float("nan")
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * std / np.sqrt(n)) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "std": std, "min": float(x.min()) if n else float("nan"),
            "max": float(x.max()) if n else float("nan"), "ci": (mean - half, mean + half)}


def paired_difference(row: dict, base: dict) -> dict | None:
    """seed_stats of row - base over the seeds both have ({seed: value} each); None when they share none."""
    shared = sorted(set(row) & set(base))
    return seed_stats([row[s] - base[s] for s in shared]) if shared else None


def _f(x, digits=3):
    return "-" if x is None or np.isnan(x) else f"{x:.{digits}f}"


def table_markdown(results: list[dict], rows: dict, baseline: str = BASELINE) -> str:
    """One markdown table per mode: per row the mean AUC over seeds, std, min-max, the 95 % CI of the mean, and the
    paired difference to `baseline` (95 % CI). results: rows of results.csv (dicts with mode, row, seed, mean_auc)."""
    out = []
    for mode in dict.fromkeys(r["mode"] for r in results):
        by_row = {}
        for r in results:
            if r["mode"] == mode:
                by_row.setdefault(r["row"], {})[int(r["seed"])] = float(r["mean_auc"])
        out += [f"### {mode}: data.demo_templates={MODES[mode]}", "",
                f"| row | seeds | mean AUC | std | min-max | 95 % CI of the mean | minus {baseline} (paired) |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for row in [r for r in rows if r in by_row] + [r for r in by_row if r not in rows]:
            s = seed_stats(list(by_row[row].values()))
            d = paired_difference(by_row[row], by_row[baseline]) if baseline in by_row and row != baseline else None
            diff = "-" if d is None else f"{d['mean']:+.3f} [{_f(d['ci'][0])}, {_f(d['ci'][1])}]"
            label = rows[row][0] if row in rows else row
            out.append(f"| {label} | {s['n']} | {_f(s['mean'])} | {_f(s['std'])} | {_f(s['min'])}-{_f(s['max'])} | "
                       f"[{_f(s['ci'][0])}, {_f(s['ci'][1])}] | {diff} |")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------
def run_py(config: str, workdir: Path, mode: str, overrides: dict) -> list[str]:
    return [sys.executable, str(ROOT / "run.py"), f"--config={ROOT / config}", f"--workdir={workdir}", f"--mode={mode}",
            *(flag(k, v) for k, v in overrides.items())]


def _call(cmd: list[str], log: Path, env: dict) -> tuple[float, float]:
    """Runs cmd with its output appended to `log`; returns (wall seconds, CPU seconds of the process and its
    children: user + system), or raises RuntimeError on a non-zero exit status."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    if code:
        raise RuntimeError(f"exit status {code}: {shlex.join(cmd)} (log: {log})")
    return time.perf_counter() - t0, usage.ru_utime + usage.ru_stime


def train_bert(reports: list[str], folder: Path, *, seed: int = 0, steps: int = 400, batch: int = 16,
               vocab_size: int = 512, seq_len: int = 256) -> dict:
    """A small BERT (hidden 64, 2 layers, 4 heads, MLP 256, 512 positions) trained by masked language modelling on
    `reports` (PyTorch, CPU, seeded), saved as a Hugging Face folder: vocab.txt (WordPiece trained on the same
    texts, lower case), config.json, model.safetensors. Returns {"steps", "loss_first", "loss_last", "seconds"}."""
    import torch
    import transformers
    from tokenizers import BertWordPieceTokenizer

    t0 = time.perf_counter()
    # One thread: on the 2 shared cores (load ~6) a step took 0.2-3 s with torch's 2 threads, 0.15 s with one.
    torch.set_num_threads(1)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(reports, vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                                             "[MASK]"], show_progress=False)
    wp.save_model(str(tmp))
    tok = transformers.BertTokenizerFast.from_pretrained(str(tmp))  # vocab.txt, lower case (BERT's default)
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=256, max_position_embeddings=512)
    model = transformers.BertForMaskedLM(config)
    collate = transformers.DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    encoded = tok(reports, truncation=True, max_length=seq_len)["input_ids"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 40) * max(0.0, 1 - s / steps))
    rng = np.random.default_rng(seed)
    losses = []
    model.train()
    for _ in range(steps):
        batch_ids = [{"input_ids": encoded[i]} for i in rng.choice(len(encoded), batch, replace=False)]
        loss = model(**collate(batch_ids)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    if not np.isfinite(losses).all():
        raise RuntimeError(f"the BERT's masked-LM loss is not finite: {losses[:5]} ...")
    model.save_pretrained(str(tmp))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return {"steps": steps, "loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-10:])),
            "seconds": round(time.perf_counter() - t0, 1)}


def training_reports(raw: Path, split_table: str = "train_reports.csv") -> list[str]:
    """Findings + impression of each training report of a demo (CT-RATE layout) folder."""
    with open(raw / "radiology_text_reports" / split_table, newline="") as f:
        return [f"{r['Findings_EN']} {r['Impressions_EN']}" for r in csv.DictReader(f)]


def prepare(p: Prep, args, out: Path, env: dict, dry: bool) -> None:
    work = out / "prep" / p.name
    base = out / "prep" / p.mode
    overrides = {"seed": args.data_seed, "data.demo_templates": MODES[p.mode], **fill(p.overrides, out, p.mode)}
    if p.name != p.mode:  # the mode's generated data and preprocessed images, read where they are
        overrides = {**overrides, "data.source": "ct_rate", "data.root": str(base / "raw")}
    cmd = run_py(args.config, work, "prepare", overrides)
    if dry:
        if BERT_FOLDER in p.overrides.values():
            print(f"# train the BERT of mode {p.mode} on {base / 'raw'}'s training reports -> {out / 'bert' / p.mode}")
        if p.name != p.mode:
            print(f"# copy {base / 'records' / 'cache'} to {work / 'records' / 'cache'}")
        print(shlex.join(cmd))
        return
    if BERT_FOLDER in p.overrides.values() and not (out / "bert" / p.mode / "config.json").exists():
        info = train_bert(training_reports(base / "raw"), out / "bert" / p.mode, seed=args.data_seed,
                          steps=args.bert_steps)
        (out / "bert" / p.mode / "training.json").write_text(json.dumps(info, indent=1))
        print(f"BERT of mode {p.mode}: {info}", flush=True)
        (work / "PREPARED.json").unlink(missing_ok=True)  # records of an earlier BERT's tokenizer
    if (work / "PREPARED.json").exists() and json.loads((work / "PREPARED.json").read_text()) == overrides:
        return
    if p.name != p.mode and not (work / "records" / "cache").exists():
        shutil.copytree(base / "records" / "cache", work / "records" / "cache")
    work.mkdir(parents=True, exist_ok=True)
    seconds, cpu = _call(cmd, work / "log.txt", env)
    (work / "PREPARED.json").write_text(json.dumps(overrides))
    print(f"prepared {p.name} in {seconds:.0f} s ({cpu:.0f} CPU-s)", flush=True)


def execute(r: Run, args, out: Path, env: dict) -> dict | None:
    """Trains and evaluates one run unless done; returns its results row."""
    work = out / "runs" / r.name
    overrides = fill(r.overrides, out, r.mode)
    record = {"overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}}
    done = json.loads((work / "run.json").read_text()) if (work / "run.json").exists() else None
    if done and done["overrides"] != record["overrides"]:
        raise RuntimeError(f"{work} holds a run with other overrides ({done['overrides']}): use another --out")
    if not (done and (work / "summary.json").exists()):
        work.mkdir(parents=True, exist_ok=True)
        (work / "run.json").write_text(json.dumps(record, indent=1))
        if not (work / "records").exists():
            (work / "records").symlink_to(out / "prep" / r.prep / "records")
        for stage in ("train", "eval"):
            wall, cpu = _call(run_py(args.config, work, stage, overrides), work / "log.txt", env)
            record[f"{stage}_s"], record[f"{stage}_cpu_s"] = round(wall, 1), round(cpu, 1)
        (work / "run.json").write_text(json.dumps(record, indent=1))
        print(f"{r.name}: train {record['train_s']:.0f} s ({record['train_cpu_s']:.0f} CPU-s), eval "
              f"{record['eval_s']:.0f} s ({record['eval_cpu_s']:.0f} CPU-s)", flush=True)
    return result_row(r, work)


def result_row(r: Run, work: Path) -> dict | None:
    path = work / "summary.json"
    if not path.exists():
        return None
    method = r.overrides["train.methods"][0]
    summary = json.loads(path.read_text())[method]
    timing = json.loads((work / "run.json").read_text())
    return {"mode": r.mode, "row": r.row, "seed": r.seed, "method": method, "mean_auc": summary["mean_auc"],
            **{k: timing.get(k, "") for k in ("train_s", "train_cpu_s", "eval_s", "eval_cpu_s")},
            **{f"auc:{t}": v for t, v in summary["per_task"].items()}}


def write_results(results: list[dict], rows: dict, out: Path) -> str:
    results = sorted(results, key=lambda r: (list(MODES).index(r["mode"]), list(rows).index(r["row"])
                                             if r["row"] in rows else len(rows), r["seed"]))
    columns = list(dict.fromkeys(k for r in results for k in r))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(results)
    table = table_markdown(results, rows)
    (out / "table.md").write_text(table)
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="folder of the preparations, runs and results (resumable)")
    ap.add_argument("--rows", default="issue", help='"issue" (default), "recipe", "all" or row ids, comma separated')
    ap.add_argument("--seeds", default="0,1,2", help="the runs' `seed` values (init, data order, flips)")
    ap.add_argument("--modes", default="free,templates", help="free, templates or both")
    ap.add_argument("--steps", type=int, default=300, help="training steps per run (the demo trains 700)")
    ap.add_argument("--config", default="configs/demo.py", help="config file[:variant]; configs/demo.py:tiny smokes")
    ap.add_argument("--data_seed", type=int, default=0, help="the demo data's seed, the same for every run")
    ap.add_argument("--bert_steps", type=int, default=400, help="masked-LM steps of the bert row's BERT")
    ap.add_argument("--parallel", type=int, default=2, help="runs at a time (2 on 2 cores: docs/benchmarks.md)")
    ap.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--table_only", action="store_true", help="write the table of the runs done so far, run nothing")
    args = ap.parse_args(argv)

    out = Path(args.out).resolve()
    cfg = load_config(args.config)
    rows, notes = select_rows(args.rows, cfg)
    modes = [m.strip() for m in args.modes.split(",")]
    if unknown := [m for m in modes if m not in MODES]:
        raise SystemExit(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    for note in notes:
        print(note, flush=True)
    preps, runs = plan(rows, seeds, modes, args.steps)
    print(f"{len(rows)} rows x {len(seeds)} seeds x {len(modes)} modes = {len(runs)} runs, {args.steps} steps each; "
          f"{len(preps)} preparations", flush=True)
    if args.table_only:
        results = [row for r in runs if (row := result_row(r, out / "runs" / r.name))]
        print(write_results(results, rows, out))
        return 0
    env = dict(os.environ)
    # One compilation cache for all runs: rows with the same programs compile once.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(out / "jax_cache"))
    for p in preps:  # the mode's own preparation first: the others read its data and images
        prepare(p, args, out, env, args.dry_run)
    if args.dry_run:
        for r in runs:
            work = out / "runs" / r.name
            print(f"# {r.name}: records -> {out / 'prep' / r.prep / 'records'}")
            for stage in ("train", "eval"):
                print(shlex.join(run_py(args.config, work, stage, fill(r.overrides, out, r.mode))))
        return 0
    t0 = time.perf_counter()
    results, failed = [], []
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        futures = {pool.submit(execute, r, args, out, env): r for r in runs}
        for fut in concurrent.futures.as_completed(futures):
            try:
                row = fut.result()
            except RuntimeError as e:
                failed.append(f"{futures[fut].name}: {e}")
                print(f"FAILED {failed[-1]}", flush=True)
                continue
            results.append(row)
    print(write_results([r for r in results if r], rows, out))
    print(f"{len(runs)} runs in {time.perf_counter() - t0:.0f} s; results in {out / 'results.csv'}, "
          f"{out / 'table.md'}")
    for f in failed:
        print(f"FAILED {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
