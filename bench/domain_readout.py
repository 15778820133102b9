"""Why SupCon + bank loses on domain-digits: per-domain accuracy of several read-outs.

Runs one arm of ``supcon-stream compare SCENARIO`` exactly as the benchmark does (same split
of the scenario generated with seed 0, same stream order, same event ids, so the same bank
admissions; ``learn_batch`` for every micro-batch) and, at the end of every task, scores the
test set **per domain** (per task of the scenario) with several read-outs of the same network:

- ``ncm_bank``: nearest class mean over the bank, re-encoded (SupCon's natural classifier);
- ``head``: the network's head (CE's natural classifier; under the ``supcon`` preset it is the
  PCR proxy head);
- ``learner``: NCM to the learner's own class means (``eval.class_means: stream``: a running
  mean per class and task, ``eval.means_per_class``, moved by SDC of width
  ``eval.drift_sigma``, read through the shared covariance, ``eval.covariance_shrinkage``),
  which the bank's eviction aims at; ``learner_cosine``: the same means read by cosine;
- ``ncm_all``: nearest class mean over *every* training event seen so far (not equal memory:
  what a bank without a size limit would give); ``ncm_all_task``: the same with a mean per
  class and task (the nearest decides);
- ``probe``: a logistic regression fitted on the encoder output of every training event seen
  so far (not equal memory: how much the representation still separates);
- ``stale``: NCM to running class means of the embedding each stream event had when it was
  learned (equal memory: one vector per class), never re-encoded;
- ``sdc_class`` / ``sdcSIGMA``: the same running means moved, after every micro-batch, by the
  drift of the re-encoded bank (semantic drift compensation,
  :mod:`pipeline.learning.drift`): the mean drift of the bank items of the class /
  SDC's Gaussian weights of width SIGMA over every bank item (``--sdc-sigmas``);
- ``NAME_bank`` for each of those: its means averaged 50/50 (as unit vectors) with
  ``ncm_bank``'s class means;
- ``sldaS[_hlH]``: streaming LDA (:mod:`pipeline.devtools.bench.slda`): the ``sdc0.3``
  means and a shared within-class covariance of the stream's embeddings as they were learned,
  shrunk by S towards a multiple of the identity (``--slda-shrinkages``: weights or ``oas``),
  its old contributions halved every H events (``--slda-half-lives``; ``none``: never);
  ``sldaS_stale``: the same on the stale means; ``sldaS_bankcov``: the covariance averaged
  50/50 with the within-class covariance of the re-encoded bank;
- ``lda_allS``: LDA with the class means and the shared within-class covariance of *every*
  training event seen so far, re-encoded (not equal memory: what the discriminant can do with
  a covariance and means that are not stale).

Prints one line per task end and one JSON line at the end (``--json`` appends it to a file).

``--set 'train.loss_terms={supcon: 1, proxy: 1, ace: 1}'`` trains an ER-ACE head (the ``ace``
loss term, Caccia et al. 2022) beside the ``supcon`` preset; read it in the ``head`` column.

    PYTHONPATH=. .venv/bin/python bench/domain_readout.py --method supcon --memory 20 --seed 0
    PYTHONPATH=. .venv/bin/python bench/domain_readout.py --method ce_er --memory 20 --seed 0 \
        --set 'train.loss_terms={supcon: 1, proxy: 1, ce: 1}'
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
import yaml
from sklearn.linear_model import LogisticRegression

from memory_bank.bank import MemoryBank
from memory_bank.index import make_index
from memory_bank.testing import InMemoryBankStore
from pipeline.devtools.bench.compare import LabeledStream, load_scenario_stream, make_split
from pipeline.devtools.bench.forgetting import (
    BenchConfig,
    _model_settings,
    method_by_name,
    task_batches,
)
from pipeline.devtools.bench.slda import RunningLDA, Shrinkage, discriminant, predict_lda
from pipeline.learning.batch import learn_batch
from pipeline.learning.drift import DriftFollower, RunningClassMeans, follow_encoder
from pipeline.learning.inference import ClassMeans, class_means, predict_head, predict_ncm
from pipeline.learning.model import StreamNet
from pipeline.learning.objectives import natural_classifier
from pipeline.learning.step import make_state
from pipeline.learning.stream_means import TaskClassMeans
from pipeline.streams.scenarios import gaussian_drift


def test_domains(stream_x: np.ndarray, tasks: list[str], test_x: np.ndarray) -> np.ndarray:
    """The task of every test row, found by its features (a permuted image is unique to its
    domain), so nothing here repeats how ``make_split`` draws its hold-out."""
    task_of = {row.tobytes(): task for row, task in zip(stream_x, tasks, strict=True)}
    return np.asarray([task_of[row.tobytes()] for row in test_x])


def drift_stream(events: int) -> LabeledStream:
    """gaussian-drift, seed 0, shortened to ``events`` (as in docs/forgetting.md)."""
    rows, labels, tasks = [], [], []
    for event in gaussian_drift(0, events=events):
        rows.append(event["features"])
        labels.append(str(event["label"]))
        tasks.append(str(event["task"]))
    return LabeledStream("gaussian-drift", np.asarray(rows, dtype=np.float32), labels, tasks, {})


def blend(a: ClassMeans, b: ClassMeans) -> ClassMeans:
    """The unit-vector average of two sets of class means; a class in one set only keeps its
    own mean."""
    rows = {int(c): m for c, m in zip(b.labels, b.means, strict=True)}
    rows.update(
        {
            int(c): (m + rows[int(c)]) / 2 if int(c) in rows else m
            for c, m in zip(a.labels, a.means, strict=True)
        }
    )
    labels = sorted(rows)
    stacked = torch.stack([rows[c] for c in labels])
    return ClassMeans(torch.tensor(labels), F.normalize(stacked, dim=-1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", default="domain-digits")
    p.add_argument("--method", default="supcon", help="a benchmark method (ce_er, supcon, ...)")
    p.add_argument("--memory", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="train.KEY=VALUE / model.KEY=VALUE")
    p.add_argument("--json", type=Path, help="append the result as one JSON line")
    p.add_argument("--events", type=int, help="gaussian-drift only: its length (default 20,000)")
    p.add_argument("--final-only", action="store_true", help="score at the end only")
    p.add_argument(
        "--sdc-sigmas",
        default="0.1,0.3,1",
        help="SDC's Gaussian widths (on unit vectors), one read-out column ``sdcSIGMA`` each",
    )
    p.add_argument(
        "--slda-shrinkages",
        default="oas,0.1,0.3,0.5,0.7,0.9,1",
        help="streaming LDA's shrinkage weights (or oas), one read-out column ``sldaS`` each",
    )
    p.add_argument(
        "--slda-half-lives",
        default="none,300,100",
        help="streaming LDA's covariance half-lives in events (none: no forgetting)",
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    overrides: dict[str, dict[str, Any]] = {"train": {}, "model": {}}
    for item in args.set:
        key, _, raw = item.partition("=")
        section, _, name = key.partition(".")
        overrides[section][name] = yaml.safe_load(raw)

    cfg = BenchConfig(model=overrides["model"])
    method = method_by_name(args.method)
    if args.events and args.scenario == "gaussian-drift":
        stream = drift_stream(args.events)
    else:
        stream = load_scenario_stream(args.scenario)  # seed 0, as ``compare`` generates it
    split = make_split(stream, args.seed)
    assert stream.tasks is not None
    domains = test_domains(stream.x, stream.tasks, split.test_x.numpy())
    names = list(dict.fromkeys(stream.tasks))
    y_test = split.test_y.numpy()

    torch.manual_seed(args.seed)
    train_cfg = cfg.train.model_copy(
        update={**overrides["train"], **method.train, "seed": args.seed}
    )
    model_cfg = _model_settings(split, cfg)
    model = StreamNet(model_cfg)
    state = make_state(model, train_cfg)
    generator = torch.Generator().manual_seed(args.seed)
    bank = MemoryBank(
        InMemoryBankStore(),
        make_index("faiss", model_cfg.embed_dim, "cpu", "never"),
        capacity=args.memory,
        input_dim=model_cfg.input_dim,
        embed_dim=model_cfg.embed_dim,
        device="cpu",
        seed=args.seed,
        policy=method.bank_policy,
    )
    seen = torch.zeros(model_cfg.max_classes, dtype=torch.bool)
    running = {
        "stale": RunningClassMeans(
            model_cfg.max_classes, model_cfg.embed_dim, None, compensate=False
        ),
        "sdc_class": RunningClassMeans(model_cfg.max_classes, model_cfg.embed_dim, None),
        **{
            f"sdc{sigma:g}": RunningClassMeans(model_cfg.max_classes, model_cfg.embed_dim, sigma)
            for sigma in map(float, args.sdc_sigmas.split(","))
        },
    }
    dim = model_cfg.embed_dim
    shrinkages: list[Shrinkage] = [
        v if v == "oas" else float(v) for v in args.slda_shrinkages.split(",")
    ]
    half_lives = [None if h == "none" else float(h) for h in args.slda_half_lives.split(",")]
    ldas = {
        **{
            f"_hl{h:g}" if h else "": RunningLDA(model_cfg.max_classes, dim, 0.3, h)
            for h in half_lives
        },
        "_stale": RunningLDA(model_cfg.max_classes, dim, 0.3, compensate=False),
    }
    follower = DriftFollower({**running, **{f"lda{k}": v for k, v in ldas.items()}})
    # the learner's own class means (a mean per class and task, eval.means_per_class), which
    # the bank's eviction aims at, as in the benchmark
    learner_means = TaskClassMeans(
        model_cfg.max_classes,
        dim,
        cfg.eval.drift_sigma,
        cfg.eval.means_per_class,
        shrinkage=cfg.eval.covariance_shrinkage,
    )
    follower.means["learner"] = learner_means
    bank.set_eviction_target(learner_means.mean_of)
    task_index = {t: i for i, t in enumerate(names)}

    def per_domain(predicted: np.ndarray) -> dict[str, float]:
        """Mean over classes of the per-class accuracy, on each domain's test rows (the classes
        a domain holds: all of them on domain-digits, the task's two on split-digits)."""
        ok = predicted == y_test
        out = {}
        for d in names:
            rows = domains == d
            accs = [ok[rows & (y_test == c)].mean() for c in np.unique(y_test[rows])]
            out[d] = round(float(np.mean(accs)), 3)
        return out

    @torch.no_grad()
    def evaluate(rows: np.ndarray) -> dict[str, dict[str, float]]:
        model.eval()
        _, bank_x, bank_y = bank.occupied()
        train_x = torch.from_numpy(split.train_x[rows])
        train_y = split.train_y[rows]
        means_bank = class_means(model, bank_x, bank_y)
        means_all = class_means(model, train_x, torch.from_numpy(train_y))
        probe = LogisticRegression(max_iter=300).fit(model.embed(train_x).numpy(), train_y)
        stream_means = {name: means.class_means() for name, means in running.items()}

        def ncm(means: ClassMeans) -> dict[str, float]:
            return per_domain(predict_ncm(model, split.test_x, means)[0].numpy())

        # the re-encoded bank's within-class covariance, for the ``_bankcov`` columns
        bank_e = F.normalize(model.embed(bank_x).float(), dim=-1).double()
        bank_scatter = torch.zeros(bank_e.shape[1], bank_e.shape[1], dtype=torch.float64)
        for c in torch.unique(bank_y).tolist():
            centred = bank_e[bank_y == c] - bank_e[bank_y == c].mean(dim=0)
            bank_scatter += centred.T @ centred
        bank_cov = bank_scatter / max(bank_e.shape[0], 1)

        def lda_columns() -> dict[str, dict[str, float]]:
            out = {}
            everything = RunningLDA(model_cfg.max_classes, dim, None)
            everything.add(
                F.normalize(model.embed(train_x).float(), dim=-1), torch.from_numpy(train_y)
            )
            for s in ("oas", 0.3):
                out[f"lda_all{s}"] = per_domain(
                    predict_lda(model, split.test_x, everything.discriminant(s))[0].numpy()
                )
            for s in shrinkages:
                for suffix, lda in ldas.items():
                    if suffix == "_stale" and s != "oas":
                        continue
                    lda_s = lda.discriminant(s)
                    out[f"slda{s}{suffix}"] = per_domain(
                        predict_lda(model, split.test_x, lda_s)[0].numpy()
                    )
                base = ldas.get("")  # no forgetting: ``none`` among the half-lives
                if base is None:
                    continue
                labels, means = base.class_means.seen()
                cov = (base.covariance() + bank_cov) / 2
                blended = discriminant(labels, means, cov, s, base.weight + bank_e.shape[0])
                out[f"slda{s}_bankcov"] = per_domain(
                    predict_lda(model, split.test_x, blended)[0].numpy()
                )
            return out

        k = model_cfg.max_classes
        keyed = class_means(model, train_x, torch.from_numpy(train_y + np.asarray(done_task) * k))
        return {
            "learner": ncm(learner_means.class_means()),
            "learner_cosine": ncm(learner_means.cosine_means()),
            "ncm_all_task": ncm(ClassMeans(keyed.labels % k, keyed.means)),
            "ncm_bank": per_domain(predict_ncm(model, split.test_x, means_bank)[0].numpy()),
            "head": per_domain(predict_head(model, split.test_x, seen)[0].numpy()),
            "ncm_all": per_domain(predict_ncm(model, split.test_x, means_all)[0].numpy()),
            "probe": per_domain(probe.predict(model.embed(split.test_x).numpy())),
            **{name: ncm(means) for name, means in stream_means.items()},
            **{f"{name}_bank": ncm(blend(m, means_bank)) for name, m in stream_means.items()},
            **lda_columns(),
        }

    history: list[dict[str, Any]] = []
    done: list[int] = []
    done_task: list[int] = []
    for task, batches in task_batches(split, args.seed, cfg.stream_batch):
        for mb in batches:
            seen[mb.y] = True
            learn_batch(state, bank, train_cfg, mb.x, mb.y, seen, generator, mb.items)
            follow_encoder(
                follower, model, bank, mb.x, mb.y, cfg.eval.drift_probe_items, mb.items[2]
            )
            done.extend(mb.rows.tolist())
            done_task.extend([task_index[task]] * len(mb.rows))
        if args.final_only and len(done) < len(split.train_y):
            continue
        scores = evaluate(np.asarray(done))
        history.append({"task": task, **scores})
        means = {k: round(float(np.mean(list(v.values()))), 3) for k, v in scores.items()}
        print(f"after task {task}: {means}  per domain: {scores}", flush=True)
    natural = "head" if natural_classifier(train_cfg) == "head" else "ncm_bank"
    final = {k: float(np.mean(list(v.values()))) for k, v in history[-1].items() if k != "task"}
    result = {
        "scenario": args.scenario,
        "method": args.method,
        "memory": args.memory,
        "seed": args.seed,
        "set": args.set,
        "natural": natural,
        "final": final,
        "history": history,
    }
    print(json.dumps({k: result[k] for k in ("method", "memory", "seed", "set", "final")}))
    if args.json:
        with args.json.open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
