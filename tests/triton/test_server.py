"""A real tritonserver on loopback serving repositories generated from real tiny exports (a compressed random
LLaMA, exported by slim_trt.exporter with the decomposed and with the LowRankAdd-plugin low-rank path): numbers
through HTTP and gRPC against local ONNX Runtime, concurrent load, bad requests, a clean stop of `slim-trt serve`."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.triton
pytest.importorskip("tritonclient.http", reason="the server tests talk through tritonclient")

from tritonclient.utils import InferenceServerException  # noqa: E402

from slim_trt.triton import Sampling, TritonServer, deploy, local_generate  # noqa: E402
from slim_trt.triton import client as tc  # noqa: E402
from slim_trt.runtime import decoder as rt  # noqa: E402
from slim_trt.triton.server import processes_in_group  # noqa: E402


def tiny_export(folder: Path, lowrank: str) -> Path:
    """A compressed tiny LLaMA (2:4 + INT4 + rank-4 adapters) exported in fp32 with its KV cache and tokenizer."""
    from slim_trt.exporter import ExportOptions, export_model
    from tests.conftest import tiny_tokenizer
    from tests.exporter.conftest import compressed_model

    model = compressed_model("llama")
    tiny_tokenizer(model.config.vocab_size).save_pretrained(str(folder / "tokenizer_src"))
    # The plugin export also quantizes its embedding/head, so the server's runtime rewrites both for ONNX Runtime.
    head = "int8" if lowrank == "plugin" else "none"
    export_model(model, folder / lowrank, options=ExportOptions(dtype="fp32", lowrank=lowrank, head=head),
                 tokenizer_dir=folder / "tokenizer_src")
    return folder / lowrank


def two_decoder_repository(export: Path, folder: Path) -> Path:
    """One repository where text generation runs both ways, so one server start covers both: slim_generate runs
    ONNX Runtime in its own process, bls_generate calls slim_onnx through Triton (business-logic scripting).
    `deploy` names a BLS decoder after its own prefix (bls_onnx); pointing it at slim_onnx instead saves a third
    copy of the model in the server."""
    repo = deploy(export, folder / "repo").repo
    other = deploy(export, folder / "bls", name="bls", generate_via="onnx").repo
    shutil.copytree(other / "bls_generate", repo / "bls_generate")
    config = repo / "bls_generate" / "config.pbtxt"
    config.write_text(config.read_text().replace('string_value: "bls_onnx"', 'string_value: "slim_onnx"'))
    manifest = json.loads((repo / "slim_repository.json").read_text())
    manifest["models"]["bls_generate"] = dict(manifest["models"]["slim_generate"], depends_on=["slim_onnx"])
    (repo / "slim_repository.json").write_text(json.dumps(manifest, indent=2))
    return repo


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The module's server runs the decomposed export; the `slim-trt serve` test runs the plugin one (LowRankAdd
    through the exporter's ONNX Runtime kernel inside the python stub)."""
    folder = tmp_path_factory.mktemp("tiny_exports")
    return {"plugin": tiny_export(folder, "plugin"), "decomposed": tiny_export(folder, "decomposed")}


@pytest.fixture(scope="module")
def words(exports):
    """Plain words of the tiny tokenizer's vocabulary, to build prompts from."""
    vocab = json.loads((exports["decomposed"] / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    return [w for w, i in sorted(vocab.items(), key=lambda kv: kv[1]) if not w.startswith("<")]


@pytest.fixture(scope="module")
def prompts(words):
    return [" ".join(words[(start + 7 * i) % len(words)] for i in range(n)) for n, start in
            ((1, 0), (5, 3), (12, 9), (30, 1))]


@pytest.fixture(scope="module")
def server(tritonserver_install, exports, tmp_path_factory):
    folder = tmp_path_factory.mktemp("triton")
    repo = two_decoder_repository(exports["decomposed"], folder)
    srv = TritonServer(repo, log_path=folder / "tritonserver.log")
    srv.start()
    try:
        yield srv
    finally:
        pgid = srv.pid
        srv.stop()
        assert processes_in_group(pgid) == []


@pytest.fixture(params=["http", "grpc"])
def client(request, server):
    c = tc.connect(server.http_url if request.param == "http" else server.grpc_url, request.param)
    yield c
    c.close()  # an open keep-alive connection would hold the server's shutdown


@pytest.fixture(scope="module")
def local_decoders(exports):
    """The exports in ONNX Runtime in this process, opened the way the server's models open them."""
    return {kind: rt.OnnxDecoder.from_folder(folder) for kind, folder in exports.items()}


def decoder_feeds(spec: rt.DecoderSpec, ids: list[list[int]], past_len: int, rng) -> dict[str, np.ndarray]:
    ids = np.asarray(ids, dtype=np.int64)
    batch, seq = ids.shape
    feeds = {"input_ids": ids, "attention_mask": np.ones((batch, past_len + seq), np.int64),
             "position_ids": np.tile(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, 1))}
    for name in spec.past_names:
        feeds[name] = rng.normal(size=(batch, spec.num_kv_heads, past_len, spec.head_dim)).astype(np.float32)
    return feeds


def test_loads_the_python_models_and_lists_the_others(server):
    assert server.loaded == ["slim_onnx", "slim_generate", "bls_generate"]
    assert server.skipped == {"slim_ort": "this tritonserver has no onnxruntime backend"}
    skipped = json.loads((server.repo / "slim_repository.json").read_text())["skipped"]
    assert skipped == {"slim_trt": "no --engine given"}  # not generated at all


def test_decoder_outputs_equal_local_onnxruntime(client, local_decoders):
    """Prefill, one decode step with a past, and a batch of 3: every output (logits and the present cache)."""
    decoder = local_decoders["decomposed"]
    rng = np.random.default_rng(0)
    for ids, past_len in (([[1, 5, 9, 14, 30, 7]], 0), ([[11]], 6), ([[3, 4], [5, 6], [7, 8]], 4)):
        feeds = decoder_feeds(decoder.spec, ids, past_len, rng)
        served = tc.infer_decoder(client, feeds, model="slim_onnx")
        local = decoder.run(feeds)
        assert sorted(served) == sorted(decoder.spec.output_names)
        for name, expected in local.items():
            assert served[name].shape == expected.shape
            np.testing.assert_allclose(served[name], expected, rtol=1e-5, atol=1e-5, err_msg=name)


def test_only_requested_outputs_come_back(client, local_decoders):
    feeds = decoder_feeds(local_decoders["decomposed"].spec, [[2, 5, 9]], 0, np.random.default_rng(1))
    served = tc.infer_decoder(client, feeds, outputs=["logits"])
    assert list(served) == ["logits"] and served["logits"].shape == (1, 3, 256)


@pytest.mark.parametrize("model", ["slim_generate", "bls_generate"])
def test_generate_returns_local_greedy_text(client, exports, prompts, model):
    for prompt in prompts:
        text, ids = local_generate(exports["decomposed"], prompt, 10)
        result = tc.generate(client, prompt, 10, model=model)
        assert (result.text, result.token_ids) == (text, ids)
        assert result.prompt_tokens == len(prompt.split())
        assert len(ids) == 10 and text


def test_generate_sampling_with_a_seed_matches_local(client, exports, prompts):
    sampling = Sampling(temperature=2.0, top_k=40, seed=11)
    text, ids = local_generate(exports["decomposed"], prompts[1], 12, sampling)
    result = tc.generate(client, prompts[1], 12, temperature=2.0, top_k=40, seed=11)
    assert (result.text, result.token_ids) == (text, ids)
    greedy = tc.generate(client, prompts[1], 12)
    assert greedy.token_ids != ids  # the sampling inputs really reach the decode loop


def test_default_max_new_tokens_from_the_config(client, prompts):
    assert len(tc.generate(client, prompts[0]).token_ids) == 32


def _percentile(values, q):
    return float(np.percentile(np.asarray(values) * 1e3, q))


def test_concurrent_clients_have_no_errors(server, exports, local_decoders, prompts, report_measurement):
    """8 clients x 50 requests against slim_generate (HTTP) while 8 x 25 hit slim_onnx (gRPC) with same-shape
    requests that the dynamic batcher may stack; every answer is checked."""
    expected = {p: local_generate(exports["decomposed"], p, 4)[0] for p in prompts[:3]}
    decoder = local_decoders["decomposed"]
    rng = np.random.default_rng(2)
    onnx_feeds = [decoder_feeds(decoder.spec, [[int(t) for t in rng.integers(4, 256, 5)]], 3, rng)
                  for _ in range(4)]
    onnx_expected = [decoder.run(f)["logits"] for f in onnx_feeds]
    latencies, errors, lock = [], [], threading.Lock()

    def generate_worker(k):
        c = tc.connect(server.http_url, "http")
        try:
            for i in range(50):
                prompt = prompts[(k + i) % 3]
                t0 = time.perf_counter()
                try:
                    text = tc.generate(c, prompt, 4).text
                    ok = text == expected[prompt]
                except Exception as e:  # noqa: BLE001 - counted, not raised: the run reports every failure
                    ok, text = False, repr(e)
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    if not ok:
                        errors.append(text)
        finally:
            c.close()

    def onnx_worker(k):
        c = tc.connect(server.grpc_url, "grpc")
        try:
            for i in range(25):
                j = (k + i) % len(onnx_feeds)
                try:
                    logits = tc.infer_decoder(c, onnx_feeds[j], outputs=["logits"])["logits"]
                    problem = None if np.allclose(logits, onnx_expected[j], rtol=1e-5, atol=1e-5) else \
                        f"slim_onnx answer {j} differs"
                except Exception as e:  # noqa: BLE001 - every failure is counted
                    problem = repr(e)
                if problem:
                    with lock:
                        errors.append(problem)
        finally:
            c.close()

    before = _batch_stats(server, "slim_onnx")
    threads = [threading.Thread(target=generate_worker, args=(k,)) for k in range(8)]
    threads += [threading.Thread(target=onnx_worker, args=(k,)) for k in range(8)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    elapsed = time.perf_counter() - start
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert errors == []
    assert len(latencies) == 400
    after = _batch_stats(server, "slim_onnx")
    report_measurement(
        f"slim_generate under load: 8 clients x 50 requests (4 new tokens), {len(latencies)} ok, 0 errors, "
        f"p50 {_percentile(latencies, 50):.1f} ms, p99 {_percentile(latencies, 99):.1f} ms, "
        f"{len(latencies) / elapsed:.1f} req/s; meanwhile slim_onnx took 200 requests in "
        f"{after[0] - before[0]} executions (dynamic batching)")
    assert after[1] - before[1] == 200  # every slim_onnx request was inferred, batched or not


def _batch_stats(server, model) -> tuple[int, int]:
    """(execution_count, inference_count) from Triton's statistics API."""
    c = tc.connect(server.http_url, "http")
    try:
        stats = c.get_inference_statistics(model)["model_stats"][0]
    finally:
        c.close()
    return int(stats["execution_count"]), int(stats["inference_count"])


def _rejected(call) -> str:
    """The message of a request the server refused as invalid (HTTP 400 / gRPC INVALID_ARGUMENT)."""
    with pytest.raises(InferenceServerException) as info:
        call()
    assert info.value.status() in ("400", "StatusCode.INVALID_ARGUMENT"), info.value
    return info.value.message()


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, client, exports, local_decoders,
                                                                     words, prompts):
    spec = local_decoders["decomposed"].spec
    limit = spec.max_position_embeddings
    feeds = decoder_feeds(spec, [[2, 5, 9]], 2, np.random.default_rng(3))
    wrong_dtype = dict(feeds, input_ids=feeds["input_ids"].astype(np.int32))
    assert "inference input 'input_ids' data-type is 'INT32', but model 'slim_onnx' expects 'INT64'" in _rejected(
        lambda: tc.infer_decoder(client, wrong_dtype))
    wrong_rank = dict(feeds, **{"past_key_values.0.key": feeds["past_key_values.0.key"][0]})
    assert "input 'past_key_values.0.key' batch size does not match other inputs" in _rejected(
        lambda: tc.infer_decoder(client, wrong_rank))
    wrong_mask = dict(feeds, attention_mask=np.ones((1, 4), np.int64))
    assert "attention_mask has length 4, expected past + new tokens = 2 + 3 = 5" in _rejected(
        lambda: tc.infer_decoder(client, wrong_mask))
    out_of_vocab = dict(feeds, input_ids=np.array([[2, 5, 2560]], np.int64))
    assert "input_ids must be in [0, 256)" in _rejected(lambda: tc.infer_decoder(client, out_of_vocab))
    assert "empty prompt" in _rejected(lambda: tc.generate(client, ""))
    too_long = " ".join(words[i % len(words)] for i in range(limit + 1))
    assert f"prompt of {limit + 1} tokens + max_new_tokens 4 is over the model's limit of {limit} positions" in \
        _rejected(lambda: tc.generate(client, too_long, 4))
    assert "over the model's limit" in _rejected(lambda: tc.generate(client, prompts[0], limit))
    assert "top_p must be in (0, 1]" in _rejected(lambda: tc.generate(client, prompts[0], 4, temperature=1.0,
                                                                      top_p=0.0))
    assert "seed must be in [0, 2^63), got -1" in _rejected(lambda: tc.generate(client, prompts[0], 4,
                                                                                temperature=1.0, seed=-1))
    module = sys.modules[type(client).__module__.rsplit(".", 1)[0]]
    steps = module.InferInput("max_new_tokens", [1], "INT32")
    steps.set_data_from_numpy(np.array([4], dtype=np.int32))
    assert "prompt is missing" in _rejected(lambda: client.infer("slim_generate", [steps]))
    two_prompts = module.InferInput("prompt", [2], "BYTES")
    two_prompts.set_data_from_numpy(np.array([b"the", b"of"], dtype=np.object_))
    assert "unexpected shape for input 'prompt' for model 'slim_generate'" in _rejected(
        lambda: client.infer("slim_generate", [two_prompts]))
    # Still serving, with the same answers.
    _, ids = local_generate(exports["decomposed"], prompts[2], 6)
    assert tc.generate(client, prompts[2], 6).token_ids == ids
    assert server.alive()


def test_onnxruntime_and_tensorrt_configs_pass_tritons_checks(server, exports, tmp_path):
    """Loading the onnxruntime and tensorrt models fails only for want of their backends in this build: Triton read
    and normalized their configs (a platform/backend mismatch, for one, fails earlier with another message)."""
    engine = tmp_path / "tiny.plan"
    engine.write_bytes(b"not a real engine: loading stops at the missing tensorrt backend")
    extra = deploy(exports["decomposed"], tmp_path / "gpu_repo", name="gpu", device="gpu", engine=str(engine)).repo
    c = tc.connect(server.http_url, "http")
    try:
        for model, backend in (("gpu_ort", "onnxruntime"), ("gpu_trt", "tensorrt")):
            shutil.copytree(extra / model, server.repo / model)
            message = _rejected(lambda model=model: c.load_model(model))
            assert f"load failed for model '{model}'" in message
            assert f"unable to find backend library for backend '{backend}'" in message
    finally:
        c.close()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_cli_serve_stops_cleanly_on_ctrl_c(tritonserver_install, exports, local_decoders, tmp_path):
    repo = deploy(exports["plugin"], tmp_path / "repo").repo
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, "-m", "slim_trt", "serve", str(repo), "--http-port", "0",
                             "--grpc-port", "0", "--models", "slim_onnx"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines, pid, output, rest = [], None, "", ""
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            found = re.match(r"ready \(pid (\d+)\)", line)
            if found:
                pid = int(found.group(1))
                break
        output = "".join(lines)
        assert pid, output
        http = int(re.search(r"HTTP  http://127\.0\.0\.1:(\d+)", output).group(1))
        grpc = int(re.search(r"gRPC  127\.0\.0\.1:(\d+)", output).group(1))
        assert "not loaded: slim_generate (not asked for (--models))" in output
        c = tc.connect(f"127.0.0.1:{http}")
        decoder = local_decoders["plugin"]
        feeds = decoder_feeds(decoder.spec, [[2, 3]], 0, np.random.default_rng(4))
        served = tc.infer_decoder(c, feeds, outputs=["logits"])["logits"]
        np.testing.assert_allclose(served, decoder.run(feeds)["logits"], rtol=1e-5, atol=1e-5)
        c.close()
        assert len(processes_in_group(pid)) == 2  # the server and the python stub of slim_onnx
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output + rest
    assert rest.splitlines()[-2:] == ["stopping tritonserver", "stopped"]
    assert processes_in_group(pid) == []
    assert not _port_open(http) and not _port_open(grpc)
