"""`gemma4-jax ship`: a checkpoint (and optionally a chat set) to verified edge artifacts, in one resumable run.

    gemma4-jax ship --checkpoint SRC [--data chats.jsonl] --targets gguf:q4_0,gguf:q8_0,litert:int4 -o DIR

Stages, in order (each one's outputs are written atomically, then recorded in `DIR/manifest.json` with their
sha256; a rerun skips every stage whose recorded outputs are still there with those hashes, and the temporaries
a killed run left are removed):
1. `finetune` (with data): LoRA on the chats (`train.finetune`, into `DIR/finetune`; a killed run resumes from
   its last checkpoint, on the same trajectory).
2. `merge` (with data): the adapters folded into the checkpoint (`train.merge`) -> `DIR/merged`, the model the
   targets are made from (without data: the checkpoint itself).
3. `export <target>` per target: `gguf:<quant>` -> `DIR/model-<quant>.gguf` (`export.gguf`), `litert:<quant>` ->
   `DIR/litert-<quant>/` (`export.litert`, with the .litertlm bundle).
4. `verify <target>` per target, in the artifact's own runtime against our JAX forward on the same quantized
   weights, quantized here from the merged checkpoint (so a damaged file cannot agree with itself):
   - GGUF: llama.cpp (llama-cpp-python) vs `model.apply` on the GGUF's intended tensors, each encoded by the
     exporter's encoder and decoded by gguf-py (`gguf.quants.dequantize`);
   - LiteRT: the LiteRT interpreter on `model.tflite` (+ side models) and the LiteRT-LM engine on `model.litertlm`
     vs `litert_graph.step` on the exporter's quantized weights (`litert.graph_reference`).
   Verified = the runtime's logits along our greedy continuation of the prompt are within the target's tolerance
   of ours, and its greedy tokens equal ours wherever our top-1/top-2 margin exceeds twice that difference (a
   smaller margin is a near-tie that rounding may tip; decisive models have none). Also measured: quality against
   the unquantized merged model on held-out tokens (the chats' eval split, else `eval_text`): perplexity, KL and
   top-1 agreement of the runtime's own logits; and the runtime's decode tokens/s on this machine.
5. `report`: `DIR/report.md`, `DIR/report.json`, `DIR/loss.png` (with data) and `DIR/quality.png`.

A failed verification marks its artifact failed in the report; `ShipReport.ok` is then False (the CLI exits 1).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from gemma4_jax import files
from gemma4_jax.errors import Gemma4Error

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
DEFAULT_PROMPT = "The quick brown fox"
# A held-out text for models shipped without chats (random or base weights): scored when no eval text is given.
SAMPLE_TEXT = (
    "The old lighthouse keeper climbed the spiral stairs each evening to light the lamp. Ships passing the rocky "
    "coast relied on its steady beam to find the harbour, and on stormy nights he watched the waves until dawn."
)
# Max |runtime logit - JAX logit| allowed, as a fraction of the largest |JAX logit| along the checked sequence.
# GGUF: llama.cpp rounds its matmul activations to the weight's dot type (f16 / bf16 / Q8_0 blocks) and uses an f16
# GELU table (tests/test_gguf.py measured <= 1.0e-1 on logits up to ~8 at q4_0). LiteRT: the dynamic-range models
# quantize activations at run time (tests/test_litert.py: <= 1.24 % of the largest logit at int4).
TOLERANCE = {
    ("gguf", "f32"): 2e-3,
    ("gguf", "f16"): 5e-3,
    ("gguf", "bf16"): 2e-2,
    ("gguf", "q8_0"): 4e-2,
    ("gguf", "q4_0"): 5e-2,
    ("litert", "none"): 1e-3,
    ("litert", "int8"): 2e-2,
    ("litert", "int4"): 2.5e-2,
}
RUNTIMES = {"gguf": "llama.cpp", "litert": "LiteRT"}


# ----- targets -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    format: str  # "gguf" | "litert"
    quant: str  # a GGUF type (f32, f16, bf16, q8_0, q4_0) or a LiteRT quantization (none, int8, int4)

    @property
    def name(self) -> str:
        return f"{self.format}:{self.quant}"

    @property
    def artifact(self) -> str:
        """The artifact's name in the output directory: a file (GGUF) or a directory (LiteRT)."""
        return f"model-{self.quant}.gguf" if self.format == "gguf" else f"litert-{self.quant}"


def parse_targets(text: str | Sequence[str]) -> tuple[Target, ...]:
    """ "gguf:q4_0,litert:int4" (or a list of such names) -> Targets; an unknown one is one error line."""
    from gemma4_jax.export.litert import QUANTS as LITERT_QUANTS
    from gemma4_jax.quant.policy import GGUF_QUANTS

    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not names:
        raise Gemma4Error("--targets is empty; give e.g. gguf:q4_0,litert:int4")
    known = {"gguf": GGUF_QUANTS, "litert": LITERT_QUANTS}
    choices = ", ".join(f"{f}:{q}" for f, qs in known.items() for q in qs)
    targets = []
    for name in names:
        fmt, _, quant = name.partition(":")
        if fmt not in known or quant not in known[fmt]:
            raise Gemma4Error(f"unknown target {name!r}; choose from {choices}")
        target = Target(fmt, quant)
        if target in targets:
            raise Gemma4Error(f"target {name} is given twice")
        targets.append(target)
    return tuple(targets)


# ----- the report ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ArtifactReport:
    target: str
    path: str
    status: str  # "verified" | "failed"
    error: str | None = None
    size: int | None = None  # bytes (a LiteRT directory: the .litertlm bundle, else its models)
    sha256: str | None = None
    runtime: str = ""
    max_abs_logit_diff: float | None = None
    tolerance: float | None = None
    min_margin: float | None = None  # our smallest top-1/top-2 margin along the greedy steps
    jax_greedy: list[int] | None = None
    runtime_greedy: list[int] | None = None
    greedy_agreement: float | None = None  # fraction of the greedy steps where the runtime chose our token
    engine: dict | None = None  # LiteRT-LM engine: its text vs ours
    tokens_per_s: float | None = None
    perplexity: float | None = None
    perplexity_reference: float | None = None
    kl_per_token: float | None = None
    top1_agreement: float | None = None
    tokens_scored: int | None = None


@dataclasses.dataclass
class ShipReport:
    out_dir: str
    checkpoint: str
    model: str  # the checkpoint the targets were made from (the merged one after a fine-tune)
    artifacts: list[ArtifactReport]
    finetune: dict | None
    plots: list[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(a.status == "verified" for a in self.artifacts)

    def summary(self) -> str:
        verified = sum(a.status == "verified" for a in self.artifacts)
        failed = [a.target for a in self.artifacts if a.status != "verified"]
        tail = f"; FAILED: {', '.join(failed)}" if failed else ""
        return (
            f"ship: {verified}/{len(self.artifacts)} artifacts verified in {self.out_dir} "
            f"(report.md, report.json) in {self.seconds:.0f} s{tail}"
        )


# ----- manifest and stages ---------------------------------------------------------------------------------------


def _output_files(out_dir: str, rel: str) -> list[str]:
    """The files of an output (a file, or every file under a directory), relative to `out_dir`, sorted."""
    path = os.path.join(out_dir, rel)
    if os.path.isfile(path):
        return [rel]
    found = []
    for root, _, names in os.walk(path):
        found += [os.path.relpath(os.path.join(root, n), out_dir) for n in names]
    return sorted(found)


class Manifest:
    """`DIR/manifest.json`: the run's inputs and, per finished stage, its outputs' sha256 and its result."""

    def __init__(self, out_dir: str, inputs: dict):
        self.out_dir, self.path = out_dir, os.path.join(out_dir, MANIFEST)
        inputs = json.loads(json.dumps(inputs))  # as recorded (tuples become lists)
        self.data = {"gemma4_jax_ship": MANIFEST_VERSION, "inputs": inputs, "runs": 0, "stages": {}}
        if os.path.exists(self.path):
            try:
                recorded = json.loads(files.read_text(self.path))
                assert recorded["gemma4_jax_ship"] == MANIFEST_VERSION and isinstance(recorded["stages"], dict)
            except (ValueError, KeyError, TypeError, AssertionError):
                raise Gemma4Error(f"{self.path}: not a ship manifest this gemma4-jax reads; choose a new -o") from None
            if recorded["inputs"] != inputs:
                differs = sorted(k for k in inputs if recorded["inputs"].get(k) != inputs[k])
                raise Gemma4Error(
                    f"{out_dir} holds a ship run with other inputs ({', '.join(differs)}); rerun it with the same "
                    "checkpoint, data and options, or choose a new -o"
                )
            self.data = recorded
        self.data["runs"] += 1
        self.run = self.data["runs"]
        self.save()

    def save(self) -> None:
        files.write_json(self.path, self.data)

    def done(self, stage: str) -> dict | None:
        """The stage's record if it finished and its outputs are still as it wrote them, else None."""
        record = self.data["stages"].get(stage)
        if record is None:
            return None
        for rel, digest in record["outputs"].items():
            path = os.path.join(self.out_dir, rel)
            if not os.path.isfile(path) or files.sha256_file(path) != digest:
                files.log(f"ship: {rel} changed or vanished since stage {stage!r} wrote it: redoing the stage")
                del self.data["stages"][stage]
                return None
        return record

    def finish(self, stage: str, outputs: Sequence[str], result: dict | None = None) -> dict:
        hashed = {rel: files.sha256_file(os.path.join(self.out_dir, rel)) for out in outputs for rel in _output_files(
            self.out_dir, out)}  # fmt: skip
        record = {"run": self.run, "outputs": hashed, "result": result or {}}
        self.data["stages"][stage] = record
        self.save()
        return record

    def forget(self, stage: str) -> None:
        if self.data["stages"].pop(stage, None) is not None:
            self.save()


def remove_stale(out_dir: str) -> list[str]:
    """The temporaries killed runs left in `out_dir` (see `files.atomic_output`), removed."""
    removed = []
    for tmp in glob.glob(os.path.join(out_dir, ".*" + files._TMP_MARK + "*")):
        dest = os.path.join(out_dir, os.path.basename(tmp)[1:].rsplit(files._TMP_MARK, 1)[0])
        removed += files.remove_stale_temporaries(dest)
    return removed


class _Stages:
    """Numbered progress lines on stderr: `ship [3/8] export gguf:q4_0 ...`, `... done in 2.1 s`, `... skipped`."""

    def __init__(self, total: int, log: Callable[[str], None]):
        self.total, self.index, self.log = total, 0, log

    def start(self, name: str, detail: str = "") -> str:
        self.index += 1
        tag = f"ship [{self.index}/{self.total}] {name}"
        self.log(f"{tag}{': ' + detail if detail else ''} ...")
        return tag


# ----- verification ----------------------------------------------------------------------------------------------


def _margins(logits: np.ndarray) -> np.ndarray:
    top2 = np.sort(logits, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def judge(
    jax_logits: np.ndarray, runtime_logits: np.ndarray, jax_greedy: list[int], runtime_greedy: list[int], tol: float
) -> dict:
    """The verdict of one runtime against JAX along JAX's greedy continuation. `*_logits` [n, V']: the logits that
    choose each greedy token (the runtime fed JAX's tokens); `runtime_greedy`: the runtime's own argmax at each of
    those steps. Verified iff max |diff| <= tol x max |JAX logit| and every differing token falls on a near-tie
    (our top-1/top-2 margin <= 2 x max |diff|)."""
    vocab = min(jax_logits.shape[-1], runtime_logits.shape[-1])
    diff = np.abs(runtime_logits[:, :vocab].astype(np.float64) - jax_logits[:, :vocab])
    err = float(np.max(diff)) if diff.size else 0.0
    bound = tol * float(max(1.0, np.max(np.abs(jax_logits))))
    margins = _margins(jax_logits.astype(np.float64))
    steps = len(jax_greedy)
    mismatched = [i for i in range(steps) if runtime_greedy[i] != jax_greedy[i]]
    decided = [i for i in mismatched if margins[i] > 2 * err]
    error = None
    if not math.isfinite(err):
        error = "the runtime's logits are not finite (a damaged file?)"
    elif err > bound:
        error = f"max |logit diff| vs JAX {err:.4g} > {bound:.4g}"
    elif decided:
        i = decided[0]
        error = (
            f"greedy step {i}: the runtime chose {runtime_greedy[i]}, JAX {jax_greedy[i]} with "
            f"a margin of {margins[i]:.3g} > 2 x {err:.3g}"
        )
    return {
        "max_abs_logit_diff": err,
        "tolerance": bound,
        "min_margin": float(margins.min()) if steps else None,
        "greedy_agreement": (steps - len(mismatched)) / steps if steps else 1.0,
        "error": error,
    }


class _Reference:
    """The unquantized model's log-probabilities on the held-out windows, computed once per run (the model is
    loaded for it and released)."""

    def __init__(self, checkpoint: str, windows: list[list[int]], dtype):
        self.checkpoint, self.windows, self.dtype = checkpoint, windows, dtype
        self._logp: list[np.ndarray] | None = None

    def logp(self) -> list[np.ndarray]:
        if self._logp is None:
            import jax

            from gemma4_jax import api
            from gemma4_jax.quant.evaluate import _jitted_forward

            model = api.load(self.checkpoint, dtype=self.dtype, layout="checkpoint", progress=False, text_only=True)
            forward = _jitted_forward()
            self._logp = []
            for window in self.windows:
                logits = forward(model.params, np.asarray([window]), config=model.config)[0][0]
                self._logp.append(np.asarray(jax.nn.log_softmax(logits.astype(np.float32)[:-1], axis=-1)))
            del model
        return self._logp


def quality(reference: _Reference, runtime_logits: Callable[[list[int]], np.ndarray]) -> dict:
    """Perplexity (runtime and reference), KL(reference || runtime) and top-1 agreement per held-out token, from
    the runtime's logits of each window (`quant.evaluate.score_window`)."""
    from gemma4_jax.quant.evaluate import score_window

    sums, scored = np.zeros(4), 0
    for window, logp_ref in zip(reference.windows, reference.logp(), strict=True):
        logits = np.asarray(runtime_logits(window), np.float64)[:-1]
        with np.errstate(invalid="ignore", over="ignore"):  # a broken artifact's logits: NaN scores, reported
            logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
            sums += score_window(logp_ref, logp, window[1:])
        scored += len(window) - 1
    nll_ref, nll, kl, agree = sums / max(scored, 1)
    return {
        "perplexity": float(np.exp(nll)),
        "perplexity_reference": float(np.exp(nll_ref)),
        "kl_per_token": float(kl),
        "top1_agreement": float(agree),
        "tokens_scored": scored,
    }


def gguf_intended_params(source, quant: str, tokenizer_dir: str, dtype):
    """The text model's parameters as the GGUF export of `source` at `quant` is meant to hold them: each tensor
    encoded by the exporter's encoder for its type and decoded by gguf-py (`gguf.quants.dequantize`). Rows beyond
    the tokenizer's vocabulary (not in the file) stay as in `source`."""
    import gguf

    from gemma4_jax import hf_format, param_spec
    from gemma4_jax.export import gguf as gguf_export
    from gemma4_jax.hf_format import np_dtype

    vocab = gguf_export.read_vocab(tokenizer_dir)
    plans = {p.name: p for p in gguf_export.plan_tensors(source, quant, len(vocab.tokens))}
    by_hf = {}
    for leaf in param_spec.param_spec(source.config):
        if leaf.unused or leaf.part != "text":
            continue
        for index, (hf, name) in enumerate(zip(leaf.hf, leaf.gguf, strict=True)):
            by_hf[hf] = (leaf, index, name)

    def read(full_name: str):
        hit = by_hf.get(full_name.removeprefix("model.language_model.").removeprefix("model."))
        if hit is None:
            return None
        leaf, index, name = hit
        plan = plans[name]
        value = np.empty(plan.shape, np_dtype(dtype))
        per_row = math.prod(plan.shape[1:])
        step = max(1, (64 << 20) // (4 * max(per_row, 1)))  # ~64 MiB of float32 rows at a time (the PLE table: 9 GB)
        for start in range(0, plan.shape[0], step):
            rows = np.asarray(plan.read_rows(start, min(start + step, plan.shape[0])), np.float32)
            stored = gguf_export.encoder(plan.qtype)(rows)
            decoded = np.asarray(gguf.quants.dequantize(stored, plan.qtype), np.float32)
            value[start : start + step] = decoded.reshape(rows.shape)
        full_rows = leaf.hf_shapes[index][0] if leaf.hf_shapes[index] else 0
        if value.shape[:1] != (full_rows,) and leaf.hf_shapes[index]:  # a trimmed vocabulary
            rest = np.asarray(source.hf_rows(leaf, index, value.shape[0], full_rows), value.dtype)
            value = np.concatenate([value, rest])
        return value

    return hf_format.params_from_hf(
        source.config, read, dtype, text_prefix="model.", parts=("text",), source=f"GGUF {quant} of the checkpoint"
    )


def _jax_reference(config, params, prompt, n: int, cache_len: int) -> tuple[np.ndarray, list[int]]:
    """Our greedy continuation of `prompt` (`litert.jax_reference`) and the logits that chose each token [n, V]."""
    from gemma4_jax.export import litert

    prefill, decode, tokens = litert.jax_reference(config, params, prompt, n, cache_len)
    return np.concatenate([prefill[-1:], decode]), tokens


def verify_gguf(path: str, source, target: Target, prompt: list[int], n: int, reference: _Reference, dtype) -> dict:
    """llama.cpp on the GGUF at `path` against JAX on the intended weights; quality and decode rate."""
    import gc

    from gemma4_jax.export import runtimes

    cfg = source.config
    params = gguf_intended_params(source, target.quant, source.directory, dtype)
    jax_logits, jax_greedy = _jax_reference(cfg, params, prompt, n, len(prompt) + n + 1)
    del params
    gc.collect()
    window = max(len(prompt) + n, *(len(w) for w in reference.windows))
    llm = runtimes.llama(path, n_ctx=max(64, 1 << (window - 1).bit_length()))
    try:
        forced = runtimes.llama_logits(llm, prompt + jax_greedy[:-1])[len(prompt) - 1 :]
        verdict = judge(jax_logits, forced, jax_greedy, [int(x) for x in forced.argmax(-1)], TOLERANCE[
            (target.format, target.quant)])  # fmt: skip
        own = runtimes.llama_greedy(llm, prompt, n)
        measured = quality(reference, lambda w: runtimes.llama_logits(llm, w))
    finally:
        llm.close()
    # The decode rate in a context as a user runs it (this one keeps every position's logits, f32 caches).
    _, stamps = runtimes.llama_decode(path, prompt, max(n, 8))
    rate = runtimes.decode_rate(stamps)
    return verdict | measured | {"jax_greedy": jax_greedy, "runtime_greedy": own, "tokens_per_s": rate}


def verify_litert(
    directory: str, source, target: Target, prompt: list[int], prompt_text: str, n: int, reference: _Reference,
    prefill_len: int, cache_len: int,
) -> dict:  # fmt: skip
    """The LiteRT interpreter (model.tflite + side models) and the LiteRT-LM engine (model.litertlm) against JAX on
    the exporter's quantized weights; quality and decode rate (interpreter, XNNPACK)."""
    import gc

    import jax

    from gemma4_jax.api import read_params
    from gemma4_jax.export import litert

    cfg = source.config
    if target.quant == "none":
        params = read_params(source, np.float32, progress=False)
        jax_logits, jax_greedy = _jax_reference(cfg, params, prompt, n, cache_len)
    else:
        weights = litert.prepare_weights(source, target.quant, 8)
        prefill, decode, jax_greedy = litert.graph_reference(cfg, jax.device_put(weights), prompt, n, cache_len)
        jax_logits = np.concatenate([prefill[-1:], decode])
        del weights
    gc.collect()
    model = os.path.join(directory, "model.tflite")
    side = {name: os.path.join(directory, file) for name, file in litert.SIDE_MODELS.items()}
    side = {name: path for name, path in side.items() if os.path.exists(path)}
    runner = litert.LiteRTRunner(cfg, model, side, prefill_len, cache_len)
    forced = [runner.prefill(prompt)[-1]]
    for i, token in enumerate(jax_greedy[:-1]):
        forced.append(runner.decode(token, len(prompt) + i))
    forced = np.stack(forced)
    verdict = judge(jax_logits, forced, jax_greedy, [int(x) for x in forced.argmax(-1)], TOLERANCE[
        (target.format, target.quant)])  # fmt: skip
    # Free-running greedy and its decode rate.
    runner = litert.LiteRTRunner(cfg, model, side, prefill_len, cache_len)
    own = [int(runner.prefill(prompt)[-1].argmax())]
    start = time.perf_counter()
    for i in range(n - 1):
        own.append(int(runner.decode(own[-1], len(prompt) + i).argmax()))
    rate = (n - 1) / (time.perf_counter() - start) if n > 1 else float("nan")

    def logits_of(window):
        r = litert.LiteRTRunner(cfg, model, side, prefill_len, cache_len)
        return np.concatenate([r.prefill(window[i : i + prefill_len], i) for i in range(0, len(window), prefill_len)])

    result = verdict | quality(reference, logits_of) | {"jax_greedy": jax_greedy, "runtime_greedy": own}
    result["tokens_per_s"] = rate
    bundle = os.path.join(directory, "model.litertlm")
    if os.path.exists(bundle):
        result["engine"] = _check_engine(bundle, prompt, prompt_text, jax_greedy, verdict, cfg, cache_len)
        if result["engine"].get("error") and not result["error"]:
            result["error"] = "LiteRT-LM engine: " + result["engine"]["error"]
    return result


def _check_engine(bundle, prompt, prompt_text, jax_greedy, verdict, cfg, cache_len) -> dict:
    """The engine's greedy text must be its own detokenization of our greedy ids (cut at the first stop token);
    after a near-tie that the interpreter check allowed, only the text up to it must agree."""
    import tempfile

    from gemma4_jax.export import runtimes

    stops = {cfg.eos_id, 1, 106}  # <eos>, <turn|>
    until_stop = []
    for t in jax_greedy:
        if t in stops:
            break
        until_stop.append(t)
    ties = verdict["greedy_agreement"] < 1.0
    cache = tempfile.mkdtemp(prefix="gemma4-jax-engine-")
    try:
        got = runtimes.engine_greedy(bundle, prompt_text, len(jax_greedy), cache_len, cache, [until_stop])
    except Exception as e:  # a bundle the engine cannot load or run
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    expected = got["detokenized"][0]
    entry = {"text": got["text"], "jax_text": expected, "prompt_ids_equal": got["prompt_ids"] == prompt[1:]}
    entry["equal"] = got["text"] == expected
    if not entry["prompt_ids_equal"]:
        entry["error"] = f"the engine tokenized the prompt as {got['prompt_ids']}, we as {prompt[1:]}"
    elif not entry["equal"] and not ties:
        entry["error"] = f"engine greedy text {got['text']!r} != JAX's {expected!r}"
    if until_stop and got["seconds"] > 0 and entry["equal"]:
        entry["tokens_per_s"] = len(until_stop) / got["seconds"]
    return entry


# ----- plots and report ------------------------------------------------------------------------------------------


def _save_png(path: str, fig) -> None:
    with files.atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def plot_loss(path: str, metrics_file: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses, eval_steps, eval_losses = [], [], [], []
    for line in files.read_text(metrics_file).splitlines():
        entry = json.loads(line)
        if "loss" in entry:
            steps.append(entry["step"])
            losses.append(entry["loss"])
        if "eval_loss" in entry:
            eval_steps.append(entry["step"])
            eval_losses.append(entry["eval_loss"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, label="train loss")
    if eval_steps:
        ax.plot(eval_steps, eval_losses, "o-", label="eval loss (held-out chats)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("LoRA fine-tune")
    ax.legend()
    _save_png(path, fig)
    plt.close(fig)


def plot_quality(path: str, artifacts: list[ArtifactReport], reference_bytes: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (kl_ax, top1_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((kl_ax, "kl_per_token", "KL(unquantized || artifact) / token"),
                           (top1_ax, "top1_agreement", "top-1 agreement with the unquantized model")):  # fmt: skip
        ax.plot([reference_bytes / 2**20], [0.0 if key == "kl_per_token" else 1.0], "k*", label="unquantized")
        for a in artifacts:
            if a.size is None or getattr(a, key) is None:
                continue
            marker = "o" if a.status == "verified" else "x"
            ax.plot([a.size / 2**20], [getattr(a, key)], marker, label=a.target + ("" if marker == "o" else " FAILED"))
        ax.set_xscale("log")
        ax.set_xlabel("size (MiB)")
        ax.set_ylabel(label)
    top1_ax.legend(fontsize=8)
    fig.suptitle("quality vs size per target (held-out tokens, each artifact in its runtime)")
    _save_png(path, fig)
    plt.close(fig)


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def render_markdown(report: ShipReport) -> str:
    lines = [
        "# gemma4-jax ship report",
        "",
        f"- checkpoint: `{report.checkpoint}`",
        f"- targets made from: `{report.model}`",
    ]
    if report.finetune:
        ft = report.finetune
        lines.append(
            f"- LoRA fine-tune: {ft.get('steps')} steps, final loss {_fmt(ft.get('final_loss'), '.4f')}, "
            f"eval loss {_fmt(ft.get('eval_loss'), '.4f')} (`loss.png`)"
        )
    lines += [
        f"- result: {sum(a.status == 'verified' for a in report.artifacts)}/{len(report.artifacts)} verified, "
        f"{report.seconds:.0f} s",
        "",
        "| target | file | size | status | runtime | max dlogit (tol) | greedy agreement | ppl (unquantized) "
        "| KL/token | top-1 | tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in report.artifacts:
        status = "verified" if a.status == "verified" else f"**FAILED**: {a.error}"
        tol = f"{_fmt(a.max_abs_logit_diff, '.3g')} ({_fmt(a.tolerance, '.3g')})"
        ppl = f"{_fmt(a.perplexity, '.3f')} ({_fmt(a.perplexity_reference, '.3f')})"
        size = files.human_bytes(a.size) if a.size is not None else "-"
        engine = ""
        if a.engine is not None:
            engine = " + LiteRT-LM " + ("equal" if a.engine.get("equal") else "differs")
        lines.append(
            f"| {a.target} | `{os.path.basename(a.path)}` | {size} | {status} | {a.runtime}{engine} | {tol} | "
            f"{_fmt(a.greedy_agreement, '.0%')} | {ppl} | {_fmt(a.kl_per_token, '.4g')} | "
            f"{_fmt(a.top1_agreement, '.3f')} | {_fmt(a.tokens_per_s, '.1f')} |"
        )
    lines += [
        "",
        "Verified: the runtime's logits along our greedy continuation within the tolerance (a fraction of the largest "
        "logit) of our JAX forward on the same quantized weights, and its greedy tokens equal ours wherever our "
        "top-1/top-2 margin exceeds twice the logit difference. Quality: the runtime's own logits on held-out "
        "tokens against the unquantized model. tok/s: the runtime's batch-1 decode on this machine.",
    ]
    lines += ["", *[f"![{os.path.splitext(p)[0]}]({p})" for p in report.plots]]
    return "\n".join(lines) + "\n"


def write_report(report: ShipReport) -> None:
    out = report.out_dir
    for name in ("report.json", "report.md"):
        if os.path.lexists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))  # rewritten below (atomic_output writes new files)
    doc = _jsonable(dataclasses.asdict(report) | {"ok": report.ok})
    files.write_json(os.path.join(out, "report.json"), doc)
    files.write_text(os.path.join(out, "report.md"), render_markdown(report))


# ----- the task --------------------------------------------------------------------------------------------------


def _fingerprint(source, data: Sequence[str], options: dict) -> dict:
    return {
        "checkpoint": source.description,
        "config": hashlib.sha256(json.dumps(source.config.to_hf_dict(), sort_keys=True).encode()).hexdigest()[:16],
        "data": {os.path.abspath(p): files.sha256_file(p) for p in data},
        "options": options,
    }


def _directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in _output_files(path, "."))


def _artifact_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    bundle = os.path.join(path, "model.litertlm")
    if os.path.exists(bundle):
        return os.path.getsize(bundle)
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(path, "*.tflite")))


def _check_out_dir(out_dir: str) -> str:
    out_dir = os.path.abspath(out_dir)
    if os.path.isfile(os.path.join(out_dir, MANIFEST)):
        if not os.access(out_dir, os.W_OK):
            raise Gemma4Error(f"cannot write {out_dir}: permission denied (or read-only file system)")
        return out_dir
    files.check_output(out_dir, directory=True)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise files.os_error(out_dir, e) from None
    return out_dir


def ship(
    checkpoint: str,
    targets: str | Sequence[str] | Sequence[Target],
    out_dir: str,
    *,
    data: Sequence[str] | None = None,
    lora_config=None,
    train_config=None,
    prompt: str = DEFAULT_PROMPT,
    new_tokens: int = 8,
    eval_text: str | None = None,
    eval_tokens: int = 256,
    window: int = 64,
    prefill_len: int = 32,
    cache_len: int = 128,
    log: Callable[[str], None] = files.log,
) -> ShipReport:
    """Runs the stages of the module doc for `checkpoint` (a local HF or orbax checkpoint with its tokenizer) into
    `out_dir` (new, empty, or a ship run's own directory to resume) and returns the report (also written there).
    `data`: chat/text files to fine-tune on (`train.data.load_dataset`; `lora_config`/`train_config` as
    `train.finetune` takes them). `prompt` is the text whose greedy continuation (`new_tokens`) each runtime must
    reproduce; quality is scored on the chats' held-out split (or `eval_text`, or a built-in sample) in windows of
    `window` tokens, at most `eval_tokens`. `prefill_len`/`cache_len` size the LiteRT models."""
    from gemma4_jax import api, sources
    from gemma4_jax.errors import require_packages

    started = time.perf_counter()
    targets = targets if targets and isinstance(targets[0], Target) else parse_targets(targets)
    data = list(data or [])
    if new_tokens < 1 or window < 2 or eval_tokens < 2:
        raise Gemma4Error("--new-tokens must be >= 1, --window and --eval-tokens >= 2")
    if prefill_len > cache_len or len(prompt) == 0:
        raise Gemma4Error("--prefill-len must not exceed --cache-len, and --prompt must not be empty")
    for path in data:
        if not os.path.isfile(path):
            raise Gemma4Error(f"data file not found: {path}")
    if any(t.format == "gguf" for t in targets):
        require_packages("gguf", "llama_cpp", extra="test", what="ship to GGUF (verified in llama.cpp)")
    if any(t.format == "litert" for t in targets):
        require_packages("ai_edge_litert", "litert_converter", "litert_lm", extra="litert", what="ship to LiteRT")
    require_packages("matplotlib", extra="ship", what="ship's report plots")
    if data:
        require_packages("optax", "orbax.checkpoint", extra="train", what="ship --data (LoRA fine-tune)")
    source = sources.open_source(checkpoint)
    if source.directory is None or not os.path.isdir(source.directory):
        raise Gemma4Error(f"{checkpoint}: ship needs a local checkpoint directory with its tokenizer")
    tokenizer = api.load_tokenizer_of(source.directory, required=True)
    cfg = source.config
    prompt_ids = [cfg.bos_id, *tokenizer.encode(prompt)]
    if len(prompt_ids) + new_tokens > min(cache_len, cfg.max_context) or len(prompt_ids) > prefill_len:
        raise Gemma4Error(
            f"the prompt is {len(prompt_ids)} tokens: it must fit --prefill-len {prefill_len}, and with "
            f"--new-tokens {new_tokens} the cache of {cache_len}"
        )

    from gemma4_jax.train import data as train_data
    from gemma4_jax.train import loop, lora

    lora_config = lora_config or lora.LoraConfig()
    train_config = train_config or loop.TrainConfig(steps=100, batch=4, seq_len=256, save_every=25, eval_every=25)
    eval_fraction = 0.1
    dataset = None
    if data:  # bad data fails here, before any work
        dataset = train_data.load_dataset(data, tokenizer, train_config.seq_len, cfg)
        held_out = train_data.split(dataset.examples, eval_fraction, train_config.seed)[1]
        tokens = [int(t) for e in held_out for t in e.tokens]
    else:
        text = files.read_text(eval_text) if eval_text else SAMPLE_TEXT
        tokens = tokenizer.encode(text, add_bos=True)
    tokens = tokens[:eval_tokens]
    windows = [tokens[i : i + window] for i in range(0, len(tokens) - 1, window - 1)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise Gemma4Error("no held-out tokens to score quality on (give more chats, or --eval-text)")
    if max(len(w) for w in windows) > cache_len:
        raise Gemma4Error(f"--window {window} exceeds --cache-len {cache_len}")

    out_dir = _check_out_dir(out_dir)
    options = {
        "lora": dataclasses.asdict(lora_config) if data else None,
        "train": dataclasses.asdict(train_config) if data else None,
        "prompt": prompt,
        "new_tokens": new_tokens,
        "prefill_len": prefill_len,
        "cache_len": cache_len,
    }
    manifest = Manifest(out_dir, _fingerprint(source, data, options))
    for tmp in remove_stale(out_dir):
        log(f"ship: removed {os.path.basename(tmp)}, left by a killed run")
    log(f"ship: run {manifest.run} into {out_dir}: {', '.join(t.name for t in targets)}")
    # JAX computes in float32 where that fits comfortably (tiny and small models), else in bfloat16.
    dtype = "float32" if source.nbytes(np.float32) < api.available_memory() // 4 else "bfloat16"
    stages = _Stages((2 if data else 0) + 2 * len(targets) + 1, log)
    finetune_info = None
    model_dir = source.directory

    if data:
        from gemma4_jax.hf_format import HFSource, text_prefix
        from gemma4_jax.train import finetune, merge

        ft_dir = os.path.join(out_dir, "finetune")
        adapter_files = ["finetune/" + lora.PEFT_WEIGHTS, "finetune/" + lora.PEFT_CONFIG]
        tag = stages.start("finetune", f"LoRA r={lora_config.rank}, {train_config.steps} steps")
        if (record := manifest.done("finetune")) is not None:
            log(f"{tag}: done in run {record['run']}, skipped")
        else:
            t0 = time.perf_counter()
            model = api.load(source, dtype=dtype, layout="checkpoint", progress=False)
            prefix = text_prefix(source.files.names()) if isinstance(source, HFSource) else "model."
            summary = finetune.finetune(
                model, dataset, ft_dir, lora_config=lora_config, train_config=train_config,
                eval_fraction=eval_fraction, resume=True, base_model=os.path.abspath(checkpoint), text_prefix=prefix,
            )  # fmt: skip
            del model
            log(summary)
            manifest.finish("finetune", adapter_files)
            log(f"{tag}: done in {time.perf_counter() - t0:.1f} s")
        finetune_info = _finetune_info(os.path.join(ft_dir, loop.METRICS), train_config.steps)

        merged = os.path.join(out_dir, "merged")
        tag = stages.start("merge", "adapters into the checkpoint")
        if (record := manifest.done("merge")) is not None:
            log(f"{tag}: done in run {record['run']}, skipped")
        else:
            t0 = time.perf_counter()
            if os.path.lexists(merged):
                shutil.rmtree(merged)  # a merge recorded in no manifest: from a run killed while recording it
            log(merge.merge(source, ft_dir, merged))
            manifest.finish("merge", ["merged"])
            log(f"{tag}: done in {time.perf_counter() - t0:.1f} s")
        model_dir = merged

    def base():
        return sources.open_source(model_dir)

    reference = _Reference(model_dir, windows, dtype)
    artifacts: list[ArtifactReport] = []
    for target in targets:
        path = os.path.join(out_dir, target.artifact)
        report = ArtifactReport(target.name, path, "failed", runtime=RUNTIMES[target.format])
        artifacts.append(report)
        stage = f"export {target.name}"
        tag = stages.start(stage, f"-> {target.artifact}")
        record = manifest.done(stage)
        if record is not None:
            log(f"{tag}: done in run {record['run']}, skipped")
        else:
            t0 = time.perf_counter()
            manifest.forget(f"verify {target.name}")
            if os.path.isdir(path):
                shutil.rmtree(path)  # an export recorded in no manifest
            elif os.path.lexists(path):
                os.remove(path)
            try:
                log(_export(target, base(), path, prefill_len, cache_len))
            except Gemma4Error as e:
                report.error = f"export failed: {e}"
                log(f"{tag}: FAILED: {e}")
                stages.start(f"verify {target.name}", "skipped (no artifact)")
                continue
            record = manifest.finish(stage, [target.artifact])
            log(f"{tag}: done in {time.perf_counter() - t0:.1f} s")
        report.size = _artifact_size(path)
        main_file = path if os.path.isfile(path) else os.path.join(path, "model.litertlm")
        report.sha256 = record["outputs"].get(os.path.relpath(main_file, out_dir))

        stage = f"verify {target.name}"
        tag = stages.start(stage, f"in {RUNTIMES[target.format]} against JAX")
        digest = dict(record["outputs"])
        verified = manifest.done(stage)
        if verified is not None and verified["result"].get("artifact") == digest:
            log(f"{tag}: done in run {verified['run']}, skipped")
            result = verified["result"]["verdict"]
        else:
            t0 = time.perf_counter()
            try:
                if target.format == "gguf":
                    result = verify_gguf(path, base(), target, prompt_ids, new_tokens, reference, dtype)
                else:
                    result = verify_litert(
                        path, base(), target, prompt_ids, prompt, new_tokens, reference, prefill_len, cache_len
                    )
            except MemoryError:
                raise
            except Exception as e:  # the runtime could not load or run the artifact: that row fails
                result = {"error": f"the verification could not run: {type(e).__name__}: {e}"}
            manifest.finish(stage, [], {"artifact": digest, "verdict": _jsonable(result)})
            status = "FAILED: " + result["error"] if result.get("error") else "verified"
            log(f"{tag}: {status} ({time.perf_counter() - t0:.1f} s)")
        for key, value in result.items():
            if hasattr(report, key):
                setattr(report, key, value)
        report.status = "failed" if result.get("error") else "verified"

    stages.start("report", "report.md, report.json, plots")
    plots = []
    if finetune_info is not None:
        plot_loss(_replace(os.path.join(out_dir, "loss.png")), os.path.join(out_dir, "finetune", loop.METRICS))
        plots.append("loss.png")
    reference_bytes = base().nbytes()
    plot_quality(_replace(os.path.join(out_dir, "quality.png")), artifacts, reference_bytes)
    plots.append("quality.png")
    result = ShipReport(
        out_dir, checkpoint, model_dir, artifacts, finetune_info, plots, round(time.perf_counter() - started, 1)
    )
    write_report(result)
    return result


def _replace(path: str) -> str:
    """`path`, whose previous version (a finished run's report) is removed so that it can be written anew."""
    if os.path.lexists(path):
        os.remove(path)
    return path


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _finetune_info(metrics_file: str, steps: int) -> dict:
    losses, evals = {}, {}
    for line in files.read_text(metrics_file).splitlines():
        entry = json.loads(line)
        if "loss" in entry:
            losses[entry["step"]] = entry["loss"]
        if "eval_loss" in entry:
            evals[entry["step"]] = entry["eval_loss"]
    return {
        "steps": steps,
        "first_loss": losses.get(min(losses)) if losses else None,
        "final_loss": losses.get(steps),
        "eval_loss": evals.get(max(evals)) if evals else None,
        "metrics": os.path.relpath(metrics_file, os.path.dirname(os.path.dirname(metrics_file))),
    }


def _export(target: Target, source, path: str, prefill_len: int, cache_len: int) -> str:
    if target.format == "gguf":
        from gemma4_jax.export.gguf import export_gguf

        return export_gguf(source, path, quant=target.quant)
    from gemma4_jax.export.litert import export_litert

    return export_litert(
        source, path, quant=target.quant, prefill_len=prefill_len, cache_len=cache_len, modalities="text"
    )


def main_summary(report: ShipReport) -> int:
    """The CLI's exit status: 0 when every artifact verified, else 1."""
    print(report.summary(), file=sys.stdout)
    return 0 if report.ok else 1
