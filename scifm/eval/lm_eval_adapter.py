"""lm-evaluation-harness model "scifm": harness tasks on scifm checkpoints.

    scifm-lm-eval --model scifm --model_args checkpoint=PATH --tasks TASKS [lm_eval options]
    python -m scifm.eval.lm_eval_adapter --model scifm --model_args checkpoint=PATH --tasks TASKS

lm-eval <= 0.4.13 resolves `--model NAME` only against its own registry: importing this module
registers "scifm" there (`@register_model`), and `main` then runs lm_eval's own command line. The
`lm_eval.models` entry point in pyproject.toml lets an lm-eval with entry-point plugin discovery
(upstream after 0.4.13) find the model from the plain `lm_eval` command.

The three request types, on the checkpoint's own layout ([BOS] context, no [EOS], continuation):
  loglikelihood          scifm.eval.loglikelihood.score_token_continuations; an empty context is [BOS] alone
  loglikelihood_rolling  the string's tokens after [BOS], in lm-eval's disjoint rolling windows of at
                         most the sequence length (every token scored once; the last window gets as
                         much preceding context as fits), by scifm.eval.loglikelihood.score_token_continuations
  generate_until         scifm.eval.generate.generate_greedy_encoded (greedy only), cut before `until`

Too long for the sequence length (max_length), requests are cut from the left as lm-eval's own hf
model cuts them, never skipped, so every document gets a score: a loglikelihood request keeps the
last max_length + 1 ids of [BOS] + context + continuation (the whole continuation, and as much of
the context as fits), a generate_until prompt keeps its last max_length - max_gen_toks ids. Each
call logs how many requests it cut. A continuation longer than max_length, or a max_gen_toks that
leaves no room for a prompt, is an error naming the task and document. `scifm eval` instead skips
and counts the items of its own task files that do not fit.

model_args: checkpoint (required), batch_size (default 16), device (default cuda if available, else
cpu; a CUDA device where CUDA is missing falls back to the CPU, as for lm-eval's hf model),
max_length (default the run's data.seq_len), max_gen_toks (default 256). batch_size and device given
in model_args win over --batch_size / --device (lm-eval passes --batch_size 1 and --device cuda:0
when they are unset). Through `main`, a scifm error (a missing or damaged checkpoint, a bad model
argument or request) is one line on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

try:
    import lm_eval.api.registry
    import lm_eval.models  # noqa: F401  built-ins first: lm-eval only loads them into an empty registry
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("scifm.eval.lm_eval_adapter needs lm-evaluation-harness: pip install 'scifm[eval]'") from err

from scifm.core.device import pick_device
from scifm.core.errors import ScifmError, exit_on_user_error
from scifm.data.encode import EncodedDocument
from scifm.eval.fit import check_fits
from scifm.eval.generate import generate_greedy_encoded
from scifm.eval.loglikelihood import score_token_continuations
from scifm.train.export import load_checkpoint_model

log = logging.getLogger(__name__)

# generation kwargs that only shape sampling (ignored: sampling is refused), and those that change
# greedy decoding unless at these values
_SAMPLING_ONLY = ("top_p", "top_k", "min_p")
_GREEDY_REQUIRES = {"num_beams": 1, "repetition_penalty": 1.0}


class ScifmLMError(ScifmError, ValueError):
    """A bad model argument or request; `main` prints it as one line (a ValueError to lm-eval)."""


def request_name(req) -> str:
    """Which document a request belongs to, for messages."""
    if getattr(req, "task_name", None) is not None:
        return f"task {req.task_name} doc {req.doc_id}"
    return f"request {req.idx}"


def left_truncate(ids: list[int], keep: int) -> list[int]:
    """The last `keep` ids: what lm-eval's hf model feeds when a request is too long."""
    return ids[-keep:] if len(ids) > keep else ids


def log_truncated(kind: str, cut: list, total: int, limit: str) -> None:
    if cut:
        log.warning("scifm: %d of %d %s requests exceed %s and were cut from the left (first: %s)",
                    len(cut), total, kind, limit, request_name(cut[0]))


def _as_bool(value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return bool(value)


def _int_arg(name: str, value, low: int = 1) -> int:
    """A model argument that must be an integer >= low (lm-eval passes model_args as strings)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < low:
        raise ScifmLMError(f"model_args {name} must be an integer >= {low}, got {value!r}")
    return number


def _parse_batch_size(batch_size, max_batch_size) -> int:
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        chosen = _int_arg("max_batch_size", max_batch_size) if max_batch_size else 16
        log.warning("scifm: batch_size=%s is not supported; using %d", batch_size, chosen)
        return chosen
    return _int_arg("batch_size", batch_size)


def _pick_device(device: str | None) -> torch.device:
    """lm-eval passes --device, "cuda:0" when unset: on a machine without CUDA that means the CPU."""
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("scifm: device=%s but CUDA is not available; using the CPU", device)
        device = "cpu"
    return pick_device(device or "auto", "device")


class ScifmLM(LM):
    def __init__(self, checkpoint: str | None = None, batch_size: int | str = 16, max_batch_size: int | None = None,
                 device: str | None = None, max_length: int | None = None, max_gen_toks: int = 256,
                 **unknown) -> None:
        super().__init__()
        if unknown:
            raise ScifmLMError(f"unknown model_args {sorted(unknown)}; known: checkpoint, batch_size, "
                               "device, max_length, max_gen_toks")
        if not checkpoint:
            raise ScifmLMError("model_args needs checkpoint=PATH (a scifm checkpoint directory)")
        model, self.tokenizer, cfg = load_checkpoint_model(Path(checkpoint))
        self._device = _pick_device(device)
        self.model = model.to(self._device).eval()
        self.enc_cfg = cfg.model.encoders
        self.seq_len = _int_arg("max_length", max_length) if max_length else cfg.data.seq_len
        if self.seq_len > cfg.model.max_seq_len:
            raise ScifmLMError(f"max_length={self.seq_len} must be in [1, model.max_seq_len="
                               f"{cfg.model.max_seq_len}]")
        self.batch_size = _parse_batch_size(batch_size, max_batch_size)
        self.max_gen_toks = _int_arg("max_gen_toks", max_gen_toks)

    # model_args win over lm-eval's --batch_size/--device (it always passes a batch size, 1 when unset)
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "ScifmLM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "ScifmLM":
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    # -- loglikelihood ----------------------------------------------------------------------------

    def context_ids(self, context: str) -> list[int]:
        """[BOS] and the context's tokens: scifm's layout of a text context without its [EOS]."""
        return [self.tokenizer.bos_id] + self.tokenizer.encode_text(context)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        docs, n_conts, scored, cut = [], [], [], []
        for i, req in enumerate(requests):
            context, continuation = req.args
            cont = self.tokenizer.encode_text(continuation)
            if not cont:
                continue
            if len(cont) > self.seq_len:
                raise ScifmLMError(f"{request_name(req)}: the continuation of {len(cont)} tokens exceeds "
                                   f"max_length={self.seq_len}")
            ids = self.context_ids(context) + cont
            if len(ids) - 1 > self.seq_len:  # the model reads every id but the last
                ids = left_truncate(ids, self.seq_len + 1)
                cut.append(req)
            docs.append(EncodedDocument("eval", ids))
            n_conts.append(len(cont))
            scored.append(i)
        log_truncated("loglikelihood", cut, len(requests), f"max_length={self.seq_len}")
        results = score_token_continuations(self.model, self.tokenizer, self.enc_cfg, docs, n_conts,
                                            batch_size=self.batch_size)
        out: list[tuple[float, bool]] = [(0.0, True)] * len(requests)  # an empty continuation: log 1
        for i, res in zip(scored, results):
            out[i] = (res.logprob, res.greedy)
        for req, o in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, o)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for i, req in enumerate(requests):
            tokens = self.tokenizer.encode_text(req.args[0])
            for w in get_rolling_token_windows(tokens, prefix_token=self.tokenizer.bos_id,
                                               max_seq_len=self.seq_len, context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        out = [0.0] * len(requests)
        for i, lp in zip(owner, self.score_token_windows(windows)):
            out[i] += lp
        for req, o in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, o)
        return out

    def score_token_windows(self, windows: list[tuple[list[int], list[int]]]) -> list[float]:
        """Summed log-probabilities of each window's `pred` ids after its `context` ids (text only;
        the context starts the row at position 0), by score_token_continuations."""
        docs = [EncodedDocument("eval", list(ctx) + list(pred)) for ctx, pred in windows]
        for doc in docs:
            check_fits(len(doc.ids) - 1, self.seq_len, "a window")
        results = score_token_continuations(self.model, self.tokenizer, self.enc_cfg, docs,
                                            [len(pred) for _, pred in windows], batch_size=self.batch_size)
        return [r.logprob for r in results]

    # -- generation -------------------------------------------------------------------------------

    def _generation_settings(self, gen_kwargs: dict) -> tuple[tuple[str, ...], int]:
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        until = () if until is None else (until,) if isinstance(until, str) else tuple(until)
        max_gen_toks = int(kw.pop("max_gen_toks", self.max_gen_toks))
        do_sample = _as_bool(kw.pop("do_sample", None))
        temperature = kw.pop("temperature", None)
        temperature = None if temperature is None else float(temperature)
        # sampling: do_sample=True at a temperature > 0 (HF's default is 1), or a temperature > 0
        # without do_sample=False to say greedy
        sampling = (do_sample and (temperature is None or temperature > 0)) or (
            do_sample is None and temperature is not None and temperature > 0)
        if sampling:
            raise ScifmLMError(f"only greedy generation is supported, but sampling was requested "
                               f"(do_sample={do_sample}, temperature={temperature}); use do_sample=false or "
                               "temperature=0")
        for key, required in _GREEDY_REQUIRES.items():
            if key in kw and float(kw.pop(key)) != required:
                raise ScifmLMError(f"greedy generation supports only {key}={required}")
        for key in _SAMPLING_ONLY:
            kw.pop(key, None)
        if kw:
            raise ScifmLMError(f"unsupported generation kwargs {sorted(kw)}; supported: until, "
                               f"max_gen_toks, do_sample, temperature (0)")
        return until, max_gen_toks

    def prompt_ids(self, requests: list, max_gen_toks: int) -> list[list[int]]:
        """Each request's [BOS] + context, cut from the left to leave max_gen_toks of max_length."""
        keep = self.seq_len - max_gen_toks
        if keep < 1:
            raise ScifmLMError(f"{request_name(requests[0])}: max_gen_toks={max_gen_toks} leaves no room "
                               f"for a prompt within max_length={self.seq_len}; lower max_gen_toks (model_args or "
                               "the task's generation_kwargs)")
        prompts = [self.context_ids(req.args[0]) for req in requests]
        log_truncated("generate_until", [r for r, p in zip(requests, prompts) if len(p) > keep], len(requests),
                      f"max_length - max_gen_toks={keep}")
        return [left_truncate(p, keep) for p in prompts]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        settings = [self._generation_settings(req.args[1]) for req in requests]
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for i, s in enumerate(settings):
            groups.setdefault(s, []).append(i)
        out = [""] * len(requests)
        for (until, max_gen_toks), idx in groups.items():
            prompts = self.prompt_ids([requests[i] for i in idx], max_gen_toks)
            # an encoded document ends with the [EOS] generation does not feed
            docs = [EncodedDocument("eval", p + [self.tokenizer.eos_id]) for p in prompts]
            texts = generate_greedy_encoded(self.model, self.tokenizer, self.enc_cfg, docs, max_new_tokens=max_gen_toks,
                                            seq_len=self.seq_len, stop=until, batch_size=self.batch_size)
            for i, t in zip(idx, texts):
                out[i] = t
        for req, o in zip(requests, out):
            self.cache_hook.add_partial("generate_until", req.args, o)
        return out


# once per process: under `python -m` this module runs as __main__, and an lm-eval with entry-point
# discovery may have put a placeholder for the name already
if "scifm" not in lm_eval.api.registry.model_registry:
    register_model("scifm")(ScifmLM)


def main(argv: Iterable[str] | None = None) -> None:
    """lm_eval's own command line, with the "scifm" model registered (this module's import)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except ScifmError as err:  # the user's mistake: one line, not lm-eval's traceback
        exit_on_user_error(err)


if __name__ == "__main__":
    main()
