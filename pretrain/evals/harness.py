"""lm-evaluation-harness scores our checkpoints directly: `PretrainLM`, registered as the
harness model "pretrain", reads a run directory or DCP checkpoint (no HF export needed)
and answers the harness's three request kinds with our own model and scoring code.

    python -m pretrain.evals.harness --model pretrain \\
        --model_args pretrained=runs/NAME,batch_size=32 --tasks hellaswag,arc_easy
    # or from Python:
    from lm_eval import simple_evaluate
    from pretrain.evals.harness import PretrainLM
    simple_evaluate(model=PretrainLM("runs/NAME"), tasks=["lambada_openai"])

The harness's `TemplateLM` does the request bookkeeping (`_encode_pair`, the empty-context
prefix token, which is our end-of-text token as in our training data); log-likelihoods
come from `scoring.run_batch` in longest-first batches, as `pretrain eval` computes them,
so both score a task file alike (tests/test_eval.py checks all three against the
harness's own HF model on our export). `python -m pretrain.evals.harness` is the harness's
command line with this model registered first. lm-eval is a test dependency, imported
only here.
"""

from __future__ import annotations

import sys

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from pretrain.evals.scoring import Encoded, batches, run_batch


@register_model("pretrain")
class PretrainLM(TemplateLM):
    def __init__(
        self,
        pretrained: str,
        batch_size: int | str | None = 16,
        device: str | None = None,
        precision: str | None = None,
        tokenizer: str | None = None,
        max_batch_size: int | None = None,  # given by the harness; not used
    ) -> None:
        from pretrain.data.tokenizer import Tokenizer
        from pretrain.rundir import find_tokenizer, resolve_checkpoint
        from pretrain.tools.generate import load_model

        super().__init__()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, cfg = load_model(pretrained, device)
        self.target = torch.device(device)
        checkpoint = resolve_checkpoint(pretrained)
        self.tok = Tokenizer(find_tokenizer(tokenizer or cfg.data.tokenizer, checkpoint))
        self.max_length = cfg.model.max_seq_len
        self.batch_size = 16 if batch_size in (None, "auto") else int(batch_size)
        precision = precision or cfg.parallel.mixed_precision
        self.dtype = torch.bfloat16 if precision == "bf16" else None
        self.chunk = cfg.parallel.loss_chunk_tokens

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def _forward(self, inputs: torch.Tensor, targets: torch.Tensor, planned: int) -> torch.Tensor:
        with torch.autocast(self.target.type, dtype=self.dtype, enabled=self.dtype is not None):
            return self.model(
                inputs, targets, loss_chunk_tokens=self.chunk, scores=True, planned_tokens=planned
            )

    def _score(self, encoded: list[Encoded]) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool] | None] = [None] * len(encoded)
        for batch in batches(encoded, self.batch_size):
            rows = [encoded[i] for i in batch]
            for i, value in zip(batch, run_batch(self._forward, rows, self.eot_token_id, self.target), strict=True):  # fmt: skip
                out[i] = value
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        encoded = []
        for _, context, continuation in requests:
            ids = (context + continuation)[-(self.max_length + 1) :]
            encoded.append(Encoded(ids, min(len(continuation), len(ids) - 1)))
        return self._score(encoded)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each whole string's log-likelihood, in disjoint windows of max_seq_len tokens
        (the harness's own `get_rolling_token_windows`), for perplexity tasks."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        encoded, owner = [], []
        for k, request in enumerate(requests):
            (string,) = request.args
            windows = get_rolling_token_windows(
                self.tok_encode(string), self.prefix_token_id, self.max_length, 1
            )
            for context, continuation in map(make_disjoint_window, windows):
                encoded.append(Encoded((context + continuation)[-(self.max_length + 1) :], len(continuation)))  # fmt: skip
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (loglik, _) in zip(owner, self._score(encoded), strict=True):
            totals[k] += loglik
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample and temperature) continuations with the KV
        cache of `pretrain generate`, cut at the first `until` string."""
        from pretrain.tools.generate import generate

        out = []
        for request in requests:
            context, kwargs = request.args
            until = kwargs.get("until") or [self.tok.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            temperature = kwargs.get("temperature", 0.0) if kwargs.get("do_sample") else 0.0
            prompt = self.tok_encode(context)[-(self.max_length - 1) :] or [self.eot_token_id]
            new = generate(self.model, prompt, int(kwargs.get("max_gen_toks", 256)), temperature,
                           eos_id=self.eot_token_id)  # fmt: skip
            text = self.tok.decode([t for t in new if t != self.eot_token_id])
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            out.append(text)
        return out


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line, with the "pretrain" model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
