"""FlashInfer peers: the pure parts on the CPU (page tables, block masks from a plan, the
refusals), the PeerLoop wiring with a PyTorch stand-in peer, and -- with CUDA and
flashinfer -- the FlashInfer outputs against the runtime's reference attention."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from moa_search.bench import flashinfer_peer as fp
from moa_search.bench.decode_loop import DenseLoop, PeerLoop
from moa_search.bench.models import build_model
from moa_search.bench.run import CONFIG_SPECS, BenchConfig, bench
from moa_search.errors import MoaSearchError
from moa_search.patterns import Dense, Elastic, SparQ, Window
from moa_search.plan import uniform_plan
from moa_search.runtime.reference import attend_head
from moa_search.runtime.scores import Logits

try:
    import flashinfer  # noqa: F401

    HAVE_FI = torch.cuda.is_available()
except ImportError:
    HAVE_FI = False
gpu = pytest.mark.skipif(not HAVE_FI, reason="needs CUDA and flashinfer")


# --- page tables --------------------------------------------------------------------------
def test_paged_index_is_flashinfers_csr_table() -> None:
    idx = fp.paged_index(batch=3, length=35, capacity_pages=5, page_size=16)
    assert idx.indptr.tolist() == [0, 3, 6, 9]
    assert idx.indices.tolist() == [0, 1, 2, 5, 6, 7, 10, 11, 12]
    assert idx.last_page_len.tolist() == [3, 3, 3]
    assert {t.dtype for t in (idx.indptr, idx.indices, idx.last_page_len)} == {torch.int32}
    full = fp.paged_index(batch=2, length=32, capacity_pages=2, page_size=16)
    assert full.indices.tolist() == [0, 1, 2, 3] and full.last_page_len.tolist() == [16, 16]


def test_paged_index_refuses_what_does_not_fit() -> None:
    with pytest.raises(MoaSearchError, match="pages"):
        fp.paged_index(batch=1, length=33, capacity_pages=2, page_size=16)
    with pytest.raises(MoaSearchError, match="length >= 1"):
        fp.paged_index(batch=1, length=0, capacity_pages=2)


def test_paged_bytes_round_up_to_pages() -> None:
    shape = fp.PeerShape(32, 32, 8, 128, torch.bfloat16, 128**-0.5)
    # 32864 tokens = 2054 pages exactly; 32865 needs one page more
    assert fp.paged_kv_bytes(shape, 8, 32864) == 32 * 8 * 32864 * 8 * 128 * 2 * 2
    assert fp.paged_kv_bytes(shape, 1, 32865) == 32 * (32864 + 16) * 8 * 128 * 2 * 2
    assert fp.dense_store_bytes(shape, 1, 32865) == 32 * 32865 * 8 * 128 * 2 * 2


# --- block masks --------------------------------------------------------------------------
def test_head_blocks_exact_for_each_pattern() -> None:
    max_len = 1100
    dense = fp.head_blocks(Dense(), 1000, max_len)
    assert dense.sizes == (0, 0, 1000, 100) and dense.keep == (False, False, True, False)
    window = fp.head_blocks(Window(sink=64, span=256), 1000, max_len)
    assert window.sizes == (64, 680, 256, 100) and window.keep == (True, False, True, False)
    # elastic: span(1000) = floor(100 + 0.25 * 1000 + 0.5) = 350
    elastic = fp.head_blocks(Elastic(sink=32, alpha=100.0, beta=0.25), 1000, max_len)
    assert elastic.sizes == (32, 618, 350, 100)
    # a window wider than the context past its sink: everything, no middle block
    wide = fp.head_blocks(Window(sink=64, span=990), 1000, max_len)
    assert wide.sizes == (64, 0, 936, 100)
    assert sum(wide.sizes) == max_len and wide.kept_positions() == list(range(1000))


@pytest.mark.parametrize(
    "pattern",
    [Dense(), Window(sink=0, span=7), Window(sink=5, span=9), Elastic(sink=3, alpha=4.0, beta=0.5)],
)
@pytest.mark.parametrize("length", [1, 4, 13, 40])
def test_block_mask_keeps_what_the_pattern_allows(pattern, length) -> None:
    """The kept key positions are exactly those the pattern lets the newest query see."""
    blocks = fp.head_blocks(pattern, length, 48)
    q = torch.tensor([length - 1])
    allowed = pattern.allowed(q, torch.arange(length))[0]
    assert blocks.kept_positions() == allowed.nonzero().flatten().tolist()
    assert sum(blocks.sizes) == 48


def test_block_mask_folds_the_batch_into_heads() -> None:
    row = [Dense(), Window(sink=4, span=8)]
    mask, rows, cols = fp.block_mask(row, batch=3, length=20, max_len=32)
    assert mask.shape == (6, 1, 4) and mask.dtype == torch.bool
    assert rows.shape == (6, 1) and rows.dtype == torch.int32 and rows.eq(1).all()
    assert cols.shape == (6, 4) and cols.dtype == torch.int32
    for b in range(3):  # row b * Hkv + h is head h of sequence b
        assert cols[2 * b].tolist() == [0, 0, 20, 12] and mask[2 * b, 0].tolist()[2]
        assert cols[2 * b + 1].tolist() == [4, 8, 8, 12]
        assert mask[2 * b + 1, 0].tolist() == [True, False, True, False]


# --- refusals -----------------------------------------------------------------------------
def test_sparq_has_no_block_form() -> None:
    with pytest.raises(MoaSearchError, match="sparq.*no block-mask form"):
        fp.head_blocks(SparQ(r=8, k=16), 100, 128)
    model = build_model("tiny-llama", dtype=torch.float32, device="cpu")
    plan = uniform_plan(model, "sparq:r=4,k=8,local=2")
    with pytest.raises(MoaSearchError, match="layer 0 KV head 0 is sparq"):
        fp.peer_factory("plan", plan, plan_length=64)


def test_missing_flashinfer_is_one_clear_line(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # import flashinfer -> ImportError
    with pytest.raises(MoaSearchError, match="need flashinfer-python") as info:
        fp.require_flashinfer(torch.device("cuda"))
    assert "\n" not in str(info.value)


def test_flashinfer_without_cuda_is_refused(monkeypatch) -> None:
    fake = types.ModuleType("flashinfer")
    fake.page, fake.sparse = types.ModuleType("flashinfer.page"), types.ModuleType("x")
    monkeypatch.setitem(sys.modules, "flashinfer", fake)
    monkeypatch.setitem(sys.modules, "flashinfer.page", fake.page)
    monkeypatch.setitem(sys.modules, "flashinfer.sparse", fake.sparse)
    with pytest.raises(MoaSearchError, match="need a CUDA device"):
        fp.require_flashinfer(torch.device("cpu"))


def test_bench_rows_for_flashinfer_configs_on_cpu(tmp_path) -> None:
    """On a machine without flashinfer / CUDA the rows say why; no prefill rows for them;
    the memory accounting counts the paged cache."""
    config = BenchConfig(
        synthetic=0.5, batch=1, context=48, new_tokens=2, memory_budget=None,
        configs=("dense-moa", "flashinfer-dense", "flashinfer-plan"), overhead_at=None,
        dtype="float32", device="cpu",
    )  # fmt: skip
    rows = bench("tiny-llama", None, config, out=tmp_path)
    status = {r["config"]: r["status"] for r in rows if r["mode"] == "sweep"}
    assert status["dense-moa"] == "ok"
    for name in ("flashinfer-dense", "flashinfer-plan"):
        assert status[name].startswith("error: MoaSearchError: flashinfer peers need")
    assert {r["config"] for r in rows if r["mode"] == "prefill"} == {"dense-moa"}
    assert CONFIG_SPECS["flashinfer-dense"].cache == "flashinfer"


def test_peer_memory_accounting_counts_pages() -> None:
    model = build_model("tiny-llama", dtype=torch.float32, device="cpu")
    shape = fp.PeerShape.of(model)
    assert (shape.num_layers, shape.q_heads, shape.kv_heads, shape.head_dim) == (2, 4, 2, 16)
    # 100 tokens -> 7 pages of 16 = 112 slots, per layer K and V of 2 heads x 16 x 4 bytes
    assert fp.predicted_bytes("dense", model, 1, 100) == 2 * 112 * 2 * 16 * 2 * 4
    assert fp.predicted_bytes("plan", model, 1, 100) == 2 * 100 * 2 * 16 * 2 * 4


# --- PeerLoop wiring with a PyTorch stand-in ----------------------------------------------
class _TorchPeer(fp._Peer):
    """The peer protocol over a dense (B, Hkv, max_len, D) store and the reference
    attention: what the FlashInfer peers do, minus FlashInfer."""

    def __init__(self, shape, batch, max_len, plan_length, positions):
        super().__init__(shape, batch, max_len, plan_length, positions)
        size = (batch, shape.kv_heads, max_len, shape.head_dim)
        self.k = [torch.zeros(size, dtype=shape.dtype) for _ in range(shape.num_layers)]
        self.v = [torch.zeros(size, dtype=shape.dtype) for _ in range(shape.num_layers)]

    def _store(self, layer, key, value, pos):
        if key.shape[2] == 1:
            b = torch.arange(self.batch)
            self.k[layer][b, :, pos] = key[:, :, 0]
            self.v[layer][b, :, pos] = value[:, :, 0]
        else:
            self.k[layer][:, :, pos], self.v[layer][:, :, pos] = key, value

    def _read(self, layer, n):
        return self.k[layer][:, :, :n], self.v[layer][:, :, :n]

    def _decode(self, layer, query):
        n = self.positions[:, 0]  # the new token's position: keys 0..n
        k_pos = torch.arange(self.max_len)[None].expand(self.batch, -1)
        k_pos = torch.where(k_pos <= n[:, None], k_pos, torch.full_like(k_pos, -1))
        out = torch.empty_like(query)
        g = self.shape.group
        for h in range(self.shape.kv_heads):
            out[:, h * g : (h + 1) * g] = attend_head(
                query[:, h * g : (h + 1) * g], self.k[layer][:, h], self.v[layer][:, h],
                n[:, None], k_pos, Dense(), self.logits,
            )  # fmt: skip
        return out

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def predicted_nbytes(self):
        return fp.dense_store_bytes(self.shape, self.batch, self.max_len)

    def randomize(self, generator):
        for t in (*self.k, *self.v):
            t.normal_(generator=generator)


def test_peer_loop_decodes_like_the_dense_loop() -> None:
    """The attention hook, the pass-through cache and the device positions: a peer that
    attends like SDPA gives DenseLoop's greedy tokens, and the model is left as it was."""
    model = build_model("tiny-llama", dtype=torch.float32, device="cpu", seed=0)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3)
    )
    dense = DenseLoop(model, batch=2, max_cache_len=48)
    try:
        want = dense.generate(ids, 10)
    finally:
        dense.close()

    def make(m, batch, max_len, positions):
        return _TorchPeer(fp.PeerShape.of(m), batch, max_len, max_len, positions)

    impl = model.config._attn_implementation
    loop = PeerLoop(model, make, batch=2, max_cache_len=48)
    try:
        loop.allocate()
        got = loop.generate(ids, 10)
        assert loop.kv_nbytes() == loop.predicted_kv_bytes()
    finally:
        loop.close()
    assert torch.equal(got, want)
    assert model.config._attn_implementation == impl


def test_peer_loop_falls_back_to_eager_when_capture_fails(monkeypatch) -> None:
    """A peer whose kernels cannot be captured still decodes, eagerly, and the row says so."""
    from moa_search.bench import decode_loop  # noqa: PLC0415

    model = build_model("tiny-llama", dtype=torch.float32, device="cpu", seed=0)

    def make(m, batch, max_len, positions):
        return _TorchPeer(fp.PeerShape.of(m), batch, max_len, max_len, positions)

    def refuse(self, warmup=2):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(decode_loop.DecodeLoop, "capture", refuse)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    loop = PeerLoop(model, make, batch=1, max_cache_len=32)
    try:
        loop.allocate()
        loop.use_graph = True  # as on a GPU
        loop.capture()
        assert loop.graph is None and not loop.use_graph
        assert loop.note == (
            "eager: CUDA-graph capture failed (RuntimeError: operation not permitted when "
            "stream is capturing)"
        )
        loop.fill_synthetic(8)
        assert loop.run(3) >= 0 and loop.length == 11
    finally:
        loop.close()


# --- GPU: FlashInfer against the reference ------------------------------------------------
def _reference(query, keys, values, length, patterns, scale):
    """(B, Hq, 1, D) attention of a query at position length - 1 over keys 0..length-1."""
    batch, q_heads = query.shape[:2]
    g = q_heads // len(patterns)
    pos = torch.arange(length, device=query.device)[None].expand(batch, -1)
    out = torch.empty_like(query, dtype=torch.float32)
    for h, pattern in enumerate(patterns):
        out[:, h * g : (h + 1) * g] = attend_head(
            query[:, h * g : (h + 1) * g].float(), keys[:, h, :length].float(),
            values[:, h, :length].float(), pos[:, -1:], pos, pattern, Logits(scale, None),
        )  # fmt: skip
    return out


def _shape(kv_heads: int) -> fp.PeerShape:
    return fp.PeerShape(1, 4 * kv_heads, kv_heads, 128, torch.bfloat16, 128**-0.5)


def _decode_once(peer, batch, n, seed=0):
    """Prompt of n tokens, then one decode token at position n; (query, K, V, out)."""
    s, dev = peer.shape, peer.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    k = torch.randn(batch, s.kv_heads, n + 1, s.head_dim, generator=gen, device=dev).to(s.dtype)
    v = torch.randn(batch, s.kv_heads, n + 1, s.head_dim, generator=gen, device=dev).to(s.dtype)
    q = torch.randn(batch, s.q_heads, 1, s.head_dim, generator=gen, device=dev).to(s.dtype)
    qp = torch.randn(batch, s.q_heads, n, s.head_dim, generator=gen, device=dev).to(s.dtype)
    peer.forward(0, qp, k[:, :, :n], v[:, :, :n])  # prefill path stores the prompt
    peer.positions.fill_(n)
    out = peer.forward(0, q, k[:, :, n:], v[:, :, n:])
    return q, k, v, out


@gpu
def test_flashinfer_dense_matches_reference() -> None:
    batch, n = 3, 200
    pos = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
    peer = fp.DensePagedPeer(_shape(2), batch, max_len=256, plan_length=n + 1, positions=pos)
    q, k, v, out = _decode_once(peer, batch, n)
    want = _reference(q, k, v, n + 1, [Dense()] * 2, peer.shape.scale)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
    keys, values = peer._read(0, n + 1)  # the paged cache holds what was appended
    assert torch.equal(keys, k) and torch.equal(values, v)
    assert peer.nbytes() == peer.predicted_nbytes()


@gpu
def test_flashinfer_plan_matches_reference() -> None:
    batch, n = 2, 300
    row = [Dense(), Window(sink=4, span=24), Elastic(sink=8, alpha=8.0, beta=0.25),
           Window(sink=0, span=40)]  # fmt: skip
    plan = types.SimpleNamespace(heads=[row])  # one layer of four KV heads
    pos = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
    peer = fp.BlockSparsePeer(_shape(4), batch, 384, n + 1, pos, plan)
    q, k, v, out = _decode_once(peer, batch, n, seed=1)
    want = _reference(q, k, v, n + 1, row, peer.shape.scale)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)


def _gpu_model():
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    config = LlamaConfig(
        vocab_size=1024, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=128,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    return model.eval()


@gpu
@pytest.mark.parametrize("kind", ["dense", "plan"])
def test_peer_loop_graph_replays_match_eager(kind) -> None:
    """Captured in our CUDA graph, a FlashInfer step gives the eager step's tokens."""
    model = _gpu_model()
    plan = types.SimpleNamespace(  # both layers, every kind of head
        heads=[
            [Dense(), Window(sink=16, span=64)],
            [Elastic(sink=16, alpha=32.0, beta=0.25), Dense()],
        ]
    )
    make = fp.peer_factory(kind, plan if kind == "plan" else None, plan_length=512 + 4)
    loop = PeerLoop(model, make, batch=2, max_cache_len=512 + 16, out_capacity=8)
    try:
        loop.allocate()
        loop.capture()
        assert loop.graph is not None and "flashinfer 0.7" in loop.note
        loop.fill_synthetic(512)
        loop.run(4, graph=True)
        graph_tokens = loop.out_tokens[:, :4].clone()
        loop.fill_synthetic(512)
        loop.run(4, graph=False)
        assert torch.equal(loop.out_tokens[:, :4], graph_tokens)
        assert loop.kv_nbytes() == loop.predicted_kv_bytes()
    finally:
        loop.close()


@gpu
def test_bench_runs_flashinfer_beside_ours(tmp_path) -> None:
    """The bench's own shape (head_dim 128: the kernels the long run JIT-compiles)."""
    config = BenchConfig(
        synthetic=0.25, batch=1, context=1024, new_tokens=4, memory_budget=None,
        configs=("dense-moa", "plan", "flashinfer-dense", "flashinfer-plan"),
        prefill_batch=None, overhead_at=None,
    )  # fmt: skip
    rows = bench("llama3-8b-shape", None, config, out=tmp_path)
    status = {r["config"]: r["status"] for r in rows if r["mode"] == "sweep"}
    assert status == dict.fromkeys(config.configs, "ok"), status
    notes = {r["config"]: r.get("note", "") for r in rows}
    assert "BatchDecodeWithPagedKVCacheWrapper" in notes["flashinfer-dense"]
    assert "VariableBlockSparseAttentionWrapper" in notes["flashinfer-plan"]
