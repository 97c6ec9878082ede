"""Text generation from an export folder in this process: the same runtime the Triton `slim_generate` model runs
(slim_trt.runtime.decoder: the export's ONNX Runtime session config, the KV-cache decode loop), with timings.

    gen = Generator("export/gemma-slim")
    result = gen.generate("The capital of France is", max_new_tokens=32)        # greedy
    result = gen.generate(["a", "b", "c", "d"], max_new_tokens=128)            # one batch of 4
    result.texts, result.token_ids, result.timing.decode_tokens_per_second

    slim_trt.generate("export/gemma-slim", "Once upon a time", temperature=0.8, seed=0)
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import decoder as runtime
from ..errors import SlimError
from .decoder import Generation, Sampling, Timing


@dataclass
class GenerateResult:
    texts: list[str]  # the new text of each prompt (without the prompt)
    token_ids: list[list[int]]  # the new tokens of each prompt
    prompt_tokens: list[int]
    stopped_on_eos: list[bool]
    timing: Timing

    def to_dict(self) -> dict:
        return {"texts": self.texts, "token_ids": self.token_ids, "prompt_tokens": self.prompt_tokens,
                "stopped_on_eos": self.stopped_on_eos, "timing": self.timing.to_dict()}


class Generator:
    """An export loaded once (session + tokenizer) for repeated generation.

    threads: ONNX Runtime intra-op threads (0 = its default). fuse=False runs the graph's plain arithmetic (weights
    dequantized to float at load) instead of the packed-integer kernels the export's session config gives.
    w8a8_form: force the integer GEMM form of W8A8 linears (u8u8 | u8s8); default from this CPU (`self.cpu` says
    which and why).
    """

    def __init__(self, export_dir: str | Path, *, threads: int = 0, fuse: bool = True, w8a8_form: str | None = None):
        from .export_folder import read_export

        if threads < 0:
            raise SlimError(f"bad --threads {threads}: give 0 (ONNX Runtime's default) or a positive count")
        self.info = read_export(export_dir)
        spec = self.info.spec
        if not self.info.python_servable:
            raise SlimError(f"{export_dir} is a bf16 export, which ONNX Runtime cannot run on the CPU: export fp32 or "
                            "fp16 to generate here")
        try:
            self.cpu = runtime.cpu_choice(w8a8_form)
        except ValueError as e:
            raise SlimError(str(e)) from None
        self.w8a8_linears = sum(1 for r in self.info.raw.get("compressed_layers") or [] if r.get("act_scale"))
        try:
            self.decoder = runtime.OnnxDecoder(self.info.model_path, spec, threads, fuse=fuse, w8a8_form=w8a8_form)
        except SlimError:
            raise
        except Exception as e:  # onnxruntime raises its own types on broken files
            raise SlimError(f"ONNX Runtime cannot load {self.info.model_path}: {str(e).splitlines()[0][:300]}") \
                from e
        self.tokenizer = None
        if self.info.tokenizer_dir:
            try:
                self.tokenizer = runtime.load_tokenizer(self.info.tokenizer_dir)
            except Exception as e:  # transformers/tokenizers raise many types on damaged files
                raise SlimError(f"cannot load the tokenizer in {self.info.tokenizer_dir} ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200] if str(e) else 'damaged files'}): re-run "
                                f"`slim-trt export` or copy the export folder again") from None
        self.eos_token_ids = runtime.eos_ids(self.tokenizer, spec) if self.tokenizer else spec.eos_token_ids

    @property
    def spec(self) -> runtime.DecoderSpec:
        return self.decoder.spec

    def session_summary(self) -> str:
        """The CPU features that decided the session, and the W8A8 GEMM form when the export has W8A8 linears."""
        c = self.cpu
        if not self.w8a8_linears:
            return f"CPU: {' '.join(c.features)}"
        return f"CPU: {' '.join(c.features)}; {self.w8a8_linears} W8A8 linears as {c.w8a8_form} GEMMs ({c.reason})"

    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise SlimError(f"{self.info.folder} has no tokenizer folder: re-export with the tokenizer, or pass token "
                            "ids to generate_ids")
        try:
            return runtime.encode_prompt(self.tokenizer, prompt)
        except runtime.RequestError as e:
            raise SlimError(str(e)) from None

    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
                     sampling: Sampling | None = None,
                     on_step: Callable[[list[Generation]], None] | None = None) -> list[Generation]:
        """Token ids in, Generations (new ids + the batch's Timing) out; all prompts in one batch."""
        try:
            return runtime.generate_batch(self.decoder, prompts, max_new_tokens, self.eos_token_ids, sampling,
                                          on_step)
        except runtime.RequestError as e:
            raise SlimError(str(e)) from None

    def generate(self, prompt: str | Sequence[str], max_new_tokens: int = 32, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 on_step: Callable[[list[Generation]], None] | None = None) -> GenerateResult:
        """Greedy (temperature 0) or sampled text after each prompt; a list of prompts runs as one batch."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        try:
            sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        except runtime.RequestError as e:
            raise SlimError(str(e)) from None
        gens = self.generate_ids([self.encode(p) for p in prompts], max_new_tokens, sampling, on_step)
        return GenerateResult(texts=[self.tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in gens],
                              token_ids=[g.token_ids for g in gens], prompt_tokens=[len(g.prompt_ids) for g in gens],
                              stopped_on_eos=[g.stopped_on_eos for g in gens], timing=gens[0].timing)


def generate(export_dir: str | Path, prompt: str | Sequence[str], max_new_tokens: int = 32, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             threads: int = 0) -> GenerateResult:
    """Load `export_dir` and generate once (see Generator for repeated calls)."""
    return Generator(export_dir, threads=threads).generate(prompt, max_new_tokens, temperature=temperature,
                                                           top_k=top_k, top_p=top_p, seed=seed)
