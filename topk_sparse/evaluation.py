"""The evaluations a trained run can add to its report.

Each evaluator is registered by name (`topk_sparse.registry`); a model lists
the ones that apply to it, and `training.train` runs those the config asks
for (asking for one the model does not list is an error before training):

- `"calibration"`: classifiers; `CalibrationCallback` during `fit` (ECE,
  NLL, Brier score, reliability diagram), every `config.eval.every_epochs`.
- `"corruptions"`: image classifiers; accuracy and ECE under
  `config.eval.corruptions` at `config.eval.severities`, computed on the
  fly (the paper's Table 1 robustness columns).
- `"cifar10_corrupted"`: the same on TFDS CIFAR-10-C,
  `config.eval.cifar10_corrupted`.
- `"exact_match"`: seq2seq models with `generate`; greedy decoding of
  `config.eval.generate_examples` examples.
- `"two_stage"`: any model with Top-k MLPs; two-stage scoring calibrated
  after training (`config.eval.two_stage`), its recall and output cosine.
- `"allocation"`: any model; after training, one k per MLP allocated
  under a mean k (`config.eval.allocate`, `topk_sparse.allocation`), and
  the test metrics at that allocation beside uniform k, without
  fine-tuning; each MLP's active units per token.

An evaluator's `run` argument is a `training.Run`.
"""

import os

import numpy as np
import tensorflow as tf

from topk_sparse import (allocation, backend, callbacks, checks, data,
                         registry, robustness, scoring, sparsity)
from topk_sparse import ops as topk_ops
from topk_sparse.data import corruptions as corruptions_lib

def exact_match(model, dataset, num_examples):
    """Share of examples whose greedy decoding equals the target sequence.

    Decodes the first `num_examples` examples of `dataset` (batches of
    `({"encoder_tokens": ...}, targets, weights)`; fewer if it holds fewer)
    with `model.generate` for as many tokens as the targets have; positions
    where `weights` is 0 (after EOS) do not count. The layers' metrics
    are left as they were.
    """
    # One compiled decoding loop per length instead of eager steps.
    generates = {}
    correct = total = 0
    with sparsity.metrics_restored(model):
        for inputs, targets, weights in dataset:
            if total >= num_examples:
                break
            take = min(len(targets), num_examples - total)
            targets = np.asarray(targets)[:take]
            weights = np.asarray(weights)[:take]
            length = targets.shape[1]
            if length not in generates:
                generates[length] = backend.compiled(
                    lambda tokens, n=length: model.generate(tokens, n), model)
            predicted = np.asarray(generates[length](
                np.asarray(inputs["encoder_tokens"])[:take]))
            wrong = (predicted[:, :length] != targets) & (weights > 0)
            correct += int(np.sum(~wrong.any(axis=1)))
            total += take
    return correct / max(total, 1)


def _log_dir(run, name):
    return os.path.join(run.workdir, "tensorboard", name)


def _corruption_lines(name):
    def describe(report):
        if name not in report:
            return []
        return [f"{name}: accuracy / expected calibration error (%) by "
                f"corruption and severity",
                *("  " + line for line in
                  robustness.format_table(report[name]).splitlines())]
    return describe


def _write_corruptions(run, name, result):
    robustness.write_summaries(result, _log_dir(run, name), run.step())
    return {name: result}


registry.register_evaluator(
    "calibration",  # no key: runs for every classifier that validates
    requested=lambda config: bool(config.eval.every_epochs),
    callbacks=lambda run: [callbacks.CalibrationCallback(
        _log_dir(run, "calibration"), run.eval_data,
        freq=run.config.eval.every_epochs)])

registry.register_evaluator(
    "corruptions", key="eval.corruptions",
    requested=lambda config: bool(config.eval.get("corruptions")),
    check=lambda run: robustness.check_arguments(
        tuple(run.config.eval.corruptions), run.config.eval.severities),
    evaluate=lambda run: _write_corruptions(
        run, "robustness", robustness.evaluate_corruptions(
            run.model, run.eval_data, tuple(run.config.eval.corruptions),
            run.config.eval.severities,
            seed=run.config.seed)),
    describe=_corruption_lines("robustness"))

registry.register_evaluator(
    "cifar10_corrupted", key="eval.cifar10_corrupted",
    requested=lambda config: bool(config.eval.get("cifar10_corrupted")),
    evaluate=lambda run: _write_corruptions(
        run, "cifar10_corrupted", robustness.evaluate_cifar10_c(
            run.model, run.config.eval.batch_size,
            data_dir=run.config.data.get("data_dir"),
            corruptions=corruptions_lib.BENCHMARK_CORRUPTIONS,
            severities=run.config.eval.severities,
            image_size=run.config.data.get("image_size"))),
    describe=_corruption_lines("cifar10_corrupted"))

registry.register_evaluator(
    "exact_match", key="eval.generate_examples",
    requested=lambda config: bool(config.eval.get("generate_examples")),
    check=lambda run: checks.positive_int(
        run.config.eval.generate_examples, "config.eval.generate_examples"),
    evaluate=lambda run: {"eval": {"exact_match": exact_match(
        run.model, run.eval_data, run.config.eval.generate_examples)}})


def _check_two_stage(run):
    two_stage = run.config.eval.two_stage
    mlps = run.model.sparse_mlps()
    if not mlps or any(mlp.k is None for mlp in mlps.values()):
        raise ValueError(
            f"config.eval.two_stage.rank={two_stage.rank} needs Top-k MLPs: "
            f"set config.model.k, or rank 0 for the dense model.")
    for mlp in mlps.values():
        scoring.check(mlp, two_stage.rank, two_stage.candidates)
    checks.positive_int(two_stage.examples, "config.eval.two_stage.examples")


def _measure_two_stage(run):
    """Calibrates two-stage scoring on training examples, measures it on
    test examples (`scoring.calibrate`); writes the means to TensorBoard.

    Returns `{"two_stage": {"rank", "candidates", "recall", "cosine",
    "max_tokens", "layers": {mlp path: {"recall", "cosine",
    "max_tokens"}}}}`, recall and cosine averaged over MLPs, max_tokens
    their least (`scoring.max_tokens`).
    """
    two_stage = run.config.eval.two_stage
    layers = scoring.calibrate(
        run.model, data.first_inputs(run.train_data, two_stage.examples),
        two_stage.rank, two_stage.candidates,
        held_out=data.first_inputs(run.eval_data, two_stage.examples))
    candidates = {m["candidates"] for m in layers.values()}
    result = {"rank": two_stage.rank,
              # One count for all MLPs, or None: each has its own (4 k of
              # its own k), in "layers".
              "candidates": candidates.pop() if len(candidates) == 1
              else None,
              **{name: float(np.mean([m[name] for m in layers.values()]))
                 for name in ("recall", "cosine")},
              "max_tokens": min(m["max_tokens"] for m in layers.values()),
              "layers": layers}
    writer = tf.summary.create_file_writer(_log_dir(run, "two_stage"))
    with writer.as_default(step=run.step()):
        for name in ("recall", "cosine"):
            tf.summary.scalar(f"two_stage/{name}", result[name])
    writer.close()
    return {"two_stage": result}


registry.register_evaluator(
    "two_stage", key="eval.two_stage.rank",
    requested=lambda config: bool(config.eval.two_stage.rank),
    check=_check_two_stage, evaluate=_measure_two_stage,
    describe=lambda report: [
        f"two-stage scoring (rank {r['rank']}, "
        f"{r['candidates'] or 'per-MLP'} candidates), mean over MLPs on "
        f"test tokens: recall of the exact top-k {r['recall']:.4f}, output "
        f"cosine {r['cosine']:.4f}; runs "
        + (f"on calls of at most {r['max_tokens']} tokens" if r["max_tokens"]
           else f"on no call: candidates exceed "
                f"{topk_ops.GATHER_MAX_SHARE} of mlp_dim, lower them")
        for r in [report.get("two_stage")] if r])


def _check_allocation(run):
    allocate = run.config.eval.allocate
    allocation.uniform(run.model, allocate.mean_k)  # checks the budget
    checks.positive_int(allocate.examples, "config.eval.allocate.examples")
    if allocate.step is not None:
        checks.positive_int(allocate.step, "config.eval.allocate.step")
    if allocate.by not in allocation.BY:
        raise ValueError(f"config.eval.allocate.by={allocate.by!r}: choose "
                         f"one of {allocation.BY}.")


def _allocate(run):
    """Allocates k per MLP on training examples (`allocation.allocate`);
    evaluates the test split there and at uniform k; writes both, each
    MLP's k and its active units per token to TensorBoard.

    Returns `{"allocation": {"mean_k", "step", "examples", "by", "k",
    "distance", "uniform_distance", "uniform", "allocated", "layers"}}`:
    the allocation (its output distance on the training examples, and
    uniform k's), the test metrics at each, and per MLP `Profile.summary`.
    """
    allocate = run.config.eval.allocate
    batches = data.first_inputs(run.train_data, allocate.examples)
    chosen = allocation.allocate(run.model, batches, allocate.mean_k,
                                 allocate.step, allocate.by)
    uniform = allocation.uniform(run.model, allocate.mean_k)
    evaluated = {}
    with sparsity.metrics_restored(run.model):
        for name, k in (("uniform", uniform), ("allocated", chosen.k)):
            with allocation.k_applied(run.model, k):
                evaluated[name] = {
                    key: float(value) for key, value in run.model.evaluate(
                        run.eval_data, return_dict=True, verbose=0).items()
                    if "nonzero_fraction" not in key}
    result = {
        "mean_k": allocate.mean_k, "step": allocate.step,
        "examples": allocate.examples, "by": allocate.by, "k": chosen.k,
        "distance": chosen.distance,
        "uniform_distance": allocation.output_distance(run.model, batches,
                                                       uniform),
        **evaluated,
        "layers": {name: profile.summary()
                   for name, profile in chosen.profiles.items()}}
    writer = tf.summary.create_file_writer(_log_dir(run, "allocation"))
    with writer.as_default(step=run.step()):
        for name in ("uniform", "allocated"):
            for key, value in evaluated[name].items():
                tf.summary.scalar(f"allocation/{name}/{key}", value)
        for name, profile in chosen.profiles.items():
            tf.summary.scalar(f"allocation/k/{name}", chosen.k[name])
            tf.summary.histogram(f"allocation/active_units/{name}",
                                 profile.active)
    writer.close()
    return {"allocation": result}


def _allocation_lines(report):
    result = report.get("allocation")
    if not result:
        return []
    ks = ", ".join(f"{name} {k}" for name, k in result["k"].items())
    metrics = "  ".join(
        f"{key} {result['allocated'][key]:.4f} / {result['uniform'][key]:.4f}"
        for key in result["allocated"])
    return [f"k allocated per MLP at mean k {result['mean_k']} (no "
            f"fine-tuning): {ks}",
            f"  test, allocated / uniform k: {metrics}",
            f"  output distance on the training examples, allocated / "
            f"uniform k: {result['distance']:.4f} / "
            f"{result['uniform_distance']:.4f}"]


registry.register_evaluator(
    "allocation", key="eval.allocate.mean_k",
    requested=lambda config: bool(config.eval.get("allocate", {}).get(
        "mean_k")),
    check=_check_allocation, evaluate=_allocate,
    describe=_allocation_lines)

