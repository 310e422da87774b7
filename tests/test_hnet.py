"""H-Net: causality (1- and 2-stage), router gradients through STE and EMA, ratio loss, EMA resets,
batched incremental decoding == full forward, paper parameter counts (abstract init), LR modulation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.hnet import HNetConfig, HNetLM, ema_over_chunks, ratio_loss
from tests.helpers import packed_row, pydoc_bytes, stack_rows, to_jnp

SMALL = dict(ssm_d_state=8, ssm_headdim=16, ssm_chunk_size=16)
ONE = HNetConfig(arch_layout=("m1", ("T1",), "m1"), d_model=(32, 48), d_ff=(0, 64), num_heads=(2, 2),
                 capacity=(0.5,), **SMALL)
TWO = HNetConfig(arch_layout=("m1", ("T1m1", ("T1",), "m1T1"), "m1"), d_model=(32, 48, 64), d_ff=(0, 64, 96),
                 num_heads=(2, 2, 2), window=(-1, 7, -1), capacity=(0.6, 0.7), ratio_targets=(3.0, 3.0), **SMALL)


@pytest.fixture(scope="module", autouse=True)
def _precision():
    with jax.default_matmul_precision("highest"):
        yield


def _batch(L=64):
    """Two rows of real text: one single document, one with two packed documents and padding."""
    r0 = packed_row([pydoc_bytes("assignment", L - 2)], L)
    r1 = packed_row([pydoc_bytes("lambda", 20), pydoc_bytes("pass", 30)], L)
    return stack_rows([r0, r1])


@pytest.fixture(scope="module", params=["one", "two"])
def model(request):
    return HNetLM(ONE if request.param == "one" else TWO, seed=1)


def _forward(model):
    gd, st = nnx.split(model)
    return jax.jit(lambda st, b: nnx.merge(gd, st)(b)), st


def test_causality(model):
    """Changing any byte after t never changes logits at or before t (every stage, both models)."""
    fwd, st = _forward(model)
    base = _batch()
    ref = fwd(st, to_jnp(base)).logits_BxLxV
    rng = np.random.default_rng(0)
    for t in (0, 7, 23, 40, 60):
        b = {k: v.copy() for k, v in base.items()}
        b["inputs"][:, t + 1:] = rng.integers(0, 256, b["inputs"][:, t + 1:].shape)
        out = fwd(st, to_jnp(b)).logits_BxLxV
        np.testing.assert_array_equal(np.asarray(out[:, :t + 1]), np.asarray(ref[:, :t + 1]))
        assert not np.allclose(np.asarray(out[:, t + 2:]), np.asarray(ref[:, t + 2:]))


def test_incremental_decoding_matches_forward_batch4(model):
    """decode_step over B=4 rows (packed documents, padding) reproduces the full forward's logits at
    every position whose chunks fit the capacity (the rest are masked out of the loss)."""
    L = 48
    rows = [packed_row([pydoc_bytes(k, n)], L) for k, n in (("assignment", 46), ("lambda", 30), ("pass", 40))]
    rows.append(packed_row([pydoc_bytes("continue", 12), pydoc_bytes("await", 25)], L))
    batch = to_jnp(stack_rows(rows))
    gd, st = nnx.split(model)

    @jax.jit
    def run(st, batch):
        m = nnx.merge(gd, st)
        full = m(batch)
        seg = batch["segment_ids"]

        def body(cache, t):
            reset = (t == 0) | (seg[:, t] != seg[:, jnp.maximum(t - 1, 0)])
            logits, cache = m.decode_step(batch["inputs"][:, t], cache, reset)
            return cache, logits

        _, lg = jax.lax.scan(body, m.init_cache(4, L), jnp.arange(L))
        return full, jnp.swapaxes(lg, 0, 1)

    full, inc = run(st, batch)
    ok = np.asarray((batch["segment_ids"] > 0) & full.target_mask_BxL)
    assert ok.sum() > 0.8 * (np.asarray(batch["segment_ids"]) > 0).sum()
    diff = np.abs(np.asarray(inc) - np.asarray(full.logits_BxLxV)).max(-1)
    assert diff[ok].max() < 1e-4, diff[ok].max()


def test_router_gradients_through_ste_and_ema():
    """The router's q/k projections get gradient both through the STE confidence and through P in the
    EMA (each path checked alone by cutting the other)."""
    model = HNetLM(ONE, seed=2)
    batch = to_jnp(_batch())
    targets = jnp.roll(batch["inputs"], -1, axis=1)

    def ce(m):
        out = m(batch)
        lp = jax.nn.log_softmax(out.logits_BxLxV)
        return -jnp.mean(jnp.take_along_axis(lp, targets[..., None], -1))

    def router_grad_norm(cut):
        import models.hnet as H

        orig_ste, orig_ema = H.ste_one, H.ema_over_chunks
        try:
            if cut == "ste":
                H.ste_one = lambda c: jnp.ones_like(jax.lax.stop_gradient(c))
            if cut == "ema":
                H.ema_over_chunks = lambda z, P, r: orig_ema(z, jax.lax.stop_gradient(P), r)
            g = nnx.jit(nnx.grad(ce))(model)
        finally:
            H.ste_one, H.ema_over_chunks = orig_ste, orig_ema
        r = g["backbone"]["router"]
        return float(jnp.linalg.norm(r["q_proj"]["kernel"][...])), float(jnp.linalg.norm(r["k_proj"]["kernel"][...]))

    for cut in ("ste", "ema"):
        gq, gk = router_grad_norm(cut)
        assert gq > 0 and gk > 0, (cut, gq, gk)
    # and nothing else reaches the router: cutting both leaves no gradient
    import models.hnet as H

    orig_ste, orig_ema = H.ste_one, H.ema_over_chunks
    try:
        H.ste_one = lambda c: jnp.ones_like(jax.lax.stop_gradient(c))
        H.ema_over_chunks = lambda z, P, r: orig_ema(z, jax.lax.stop_gradient(P), r)
        g = nnx.jit(nnx.grad(ce))(model)
    finally:
        H.ste_one, H.ema_over_chunks = orig_ste, orig_ema
    assert float(jnp.abs(g["backbone"]["router"]["q_proj"]["kernel"][...]).max()) == 0.0


def test_every_parameter_gets_gradient():
    model = HNetLM(TWO, seed=3)
    batch = to_jnp(_batch())

    def loss(m):
        out = m(batch)
        return jnp.mean(jax.nn.logsumexp(out.logits_BxLxV, -1)) + out.aux_loss

    grads = nnx.jit(nnx.grad(loss))(model)
    flat = jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param))
    dead = [jax.tree_util.keystr(p) for p, g in flat if not np.any(np.asarray(g) != 0)]
    assert not dead, dead


@pytest.mark.parametrize("config,evaluation", [("one", False), ("two", True)])
def test_inner_stages_skip_their_padding_tail_without_changing_anything(config, evaluation, monkeypatch):
    """Inner stages run over compacted chunks followed by padding (``StackConfig.padded_tail``): the blockwise
    kernel (forced here, tiles of 8) skips the query tiles after the batch's last chunk, the blocks' position-wise
    parts skip the slot blocks after it (``hnet.layers.over_live_blocks``, blocks of 8 here), and the model's
    logits, loss and every gradient equal the run without skipping."""
    import dataclasses
    import functools

    from hnet import attention, layers
    from hnet.kernels.blockwise_attention import blockwise_attention

    skipped = []

    def record(seg):  # at run time: is some query tile of 8 padding in every row?
        skipped.append(any(not seg[:, i:i + 8].any() for i in range(0, seg.shape[1], 8)))

    def kernel(*a, skip_padding=False, **kw):
        if skip_padding:
            jax.debug.callback(record, kw["q_segment_ids_BxQ"])
        return functools.partial(blockwise_attention, block_q=8, block_k=8)(*a, skip_padding=skip_padding, **kw)

    monkeypatch.setattr(attention, "BLOCKWISE_MIN_LEN", 8)
    monkeypatch.setattr(layers, "LIVE_BLOCK_ROWS", 16)  # 2 rows: blocks of 8 slots
    monkeypatch.setitem(attention._KERNELS, "blockwise", kernel)
    cfg, batch = (ONE if config == "one" else TWO), to_jnp(_batch())

    def run(padded: bool):
        orig = HNetConfig.stack_config
        monkeypatch.setattr(HNetConfig, "stack_config",
                            lambda self, s, layout: dataclasses.replace(orig(self, s, layout), padded_tail=padded and s > 0))
        model = HNetLM(cfg, seed=2)
        monkeypatch.setattr(HNetConfig, "stack_config", orig)
        if evaluation:
            model.eval()

        def loss(m):
            out = m(batch)
            return jnp.mean(jax.nn.logsumexp(out.logits_BxLxV, -1)) + out.aux_loss, out.logits_BxLxV

        (value, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
        return value, logits, nnx.state(grads, nnx.Param)

    want, got = run(False), run(True)
    assert any(skipped), "no all-padding query tile: the test exercises nothing"
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-5, atol=1e-5)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got[2]), jax.tree_util.tree_leaves(want[2])):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_over_live_blocks_runs_f_on_live_blocks_only_and_sizes_blocks_by_rows():
    """Blocks that start before n_live get f (values and gradients), later blocks zeros; blocks hold
    ~LIVE_BLOCK_ROWS rows and are only used when at least two divide the slots."""
    from hnet.layers import LIVE_BLOCK_ROWS, live_block, over_live_blocks

    x = jax.random.normal(jax.random.key(0), (2, 32, 3))
    f = lambda x: (jnp.sin(x), 2 * x)  # noqa: E731
    for n_live, live_slots in [(0, 0), (1, 8), (8, 8), (9, 16), (32, 32)]:
        out = jax.jit(lambda x, n=n_live: over_live_blocks(f, n, 8, x))(x)
        for got, want in zip(out, f(x)):
            np.testing.assert_array_equal(np.asarray(got[:, :live_slots]), np.asarray(want[:, :live_slots]))
            assert not np.any(np.asarray(got[:, live_slots:]))
        g = jax.grad(lambda x, n=n_live: jnp.sum(over_live_blocks(f, n, 8, x)[1]))(x)
        want_g = np.broadcast_to(np.where(np.arange(32)[None, :, None] < live_slots, 2.0, 0.0), x.shape)
        np.testing.assert_array_equal(np.asarray(g), want_g)
    assert LIVE_BLOCK_ROWS == 512 and live_block(8, 512) == 64 and live_block(1, 4096) == 512
    assert live_block(2, 4096) == 256 and live_block(3, 1024) == 128  # a power of two <= 512 / B
    assert live_block(8, 64) == 0 and live_block(8, 96) == 0  # fewer than two blocks / not a multiple


@pytest.mark.parametrize("config", ["one", "two"])
def test_eval_capacity_buckets_give_the_full_run_on_fewer_slots(config):
    """In eval mode (M = L slots) the outermost stage runs its inner stage on the smallest of M/4 ... M slots
    that holds the batch's chunks (``eval_capacity_buckets`` = 4): logits, target mask, metrics and boundaries
    equal the single-size run, and the batch does take a smaller size."""
    import dataclasses

    cfg = ONE if config == "one" else TWO
    batch = to_jnp(_batch())

    def run(n):
        model = HNetLM(dataclasses.replace(cfg, eval_capacity_buckets=n), seed=2)
        model.eval()
        gd, st = nnx.split(model)
        return jax.jit(lambda st, b: nnx.merge(gd, st)(b))(st, batch)

    full, bucketed = run(1), run(4)
    chunks = int(np.max(np.sum(np.asarray(full.boundaries["s0"]), axis=1)))
    assert chunks <= 3 * batch["inputs"].shape[1] // 4, chunks  # M = L: a smaller size applies
    np.testing.assert_allclose(np.asarray(bucketed.logits_BxLxV), np.asarray(full.logits_BxLxV), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(bucketed.target_mask_BxL), np.asarray(full.target_mask_BxL))
    for k in full.metrics:
        np.testing.assert_allclose(np.asarray(bucketed.metrics[k]), np.asarray(full.metrics[k]), rtol=1e-5,
                                   atol=1e-6, err_msg=k)
    for k in full.boundaries:
        np.testing.assert_array_equal(np.asarray(bucketed.boundaries[k]), np.asarray(full.boundaries[k]))


def test_ratio_loss_hand_example():
    """Eq. 10 with N = 6, F = 0.25, G = 0.10 gives 0.96; F = G = 1/N gives exactly 1."""
    valid = jnp.ones((1, 20), bool)
    b = jnp.zeros((1, 20)).at[0, :5].set(1.0)  # F = 0.25
    p = jnp.full((1, 20), 0.10)  # G = 0.10
    loss, F, G = ratio_loss(b, p, valid, 6.0)
    assert abs(float(F) - 0.25) < 1e-7 and abs(float(G) - 0.10) < 1e-7
    assert abs(float(loss) - 6 / 5 * (5 * 0.25 * 0.10 + 0.75 * 0.90)) < 1e-6
    assert abs(float(loss) - 0.96) < 1e-6
    b6 = jnp.zeros((1, 6)).at[0, 0].set(1.0)
    loss1, _, _ = ratio_loss(b6, jnp.full((1, 6), 1 / 6), jnp.ones((1, 6), bool), 6.0)
    assert abs(float(loss1) - 1.0) < 1e-6
    # padded positions do not count
    loss_pad, F2, _ = ratio_loss(jnp.pad(b, ((0, 0), (0, 5)), constant_values=1.0), jnp.pad(p, ((0, 0), (0, 5))),
                                 jnp.pad(valid, ((0, 0), (0, 5))), 6.0)
    assert abs(float(F2) - 0.25) < 1e-7 and abs(float(loss_pad) - 0.96) < 1e-6


def test_ema_recurrence_and_document_reset():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(1, 7, 3)).astype(np.float32)
    P = rng.uniform(0.2, 0.9, size=(1, 7)).astype(np.float32)
    reset = np.zeros((1, 7), bool)
    reset[0, [0, 4]] = True
    out = np.asarray(ema_over_chunks(jnp.asarray(z), jnp.asarray(P), jnp.asarray(reset)))
    ref, prev = np.zeros_like(z), np.zeros(3, np.float32)
    for j in range(7):
        prev = P[0, j] * z[0, j] + (0.0 if reset[0, j] else (1 - P[0, j])) * prev
        ref[0, j] = prev
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    # after the reset at chunk 4 nothing from chunks 0..3 leaks in
    z2 = z.copy()
    z2[0, :4] += 100.0
    out2 = np.asarray(ema_over_chunks(jnp.asarray(z2), jnp.asarray(P), jnp.asarray(reset)))
    np.testing.assert_array_equal(out2[0, 4:], out[0, 4:])


def test_second_document_is_independent_of_the_first():
    """Router, chunking, EMA and inner stages all reset at a packed document start."""
    fwd, st = _forward(HNetLM(TWO, seed=4))
    L = 64
    a = to_jnp(stack_rows([packed_row([pydoc_bytes("lambda", 20), pydoc_bytes("pass", 30)], L)]))
    b = to_jnp(stack_rows([packed_row([pydoc_bytes("await", 20), pydoc_bytes("pass", 30)], L)]))
    la, lb = fwd(st, a).logits_BxLxV, fwd(st, b).logits_BxLxV
    np.testing.assert_allclose(np.asarray(la[0, 22:54]), np.asarray(lb[0, 22:54]), rtol=1e-5, atol=1e-5)


def test_capacity_overflow_is_masked_and_counted():
    """With a capacity far below the boundary count, overflowing bytes leave the loss and are counted."""
    cfg = HNetConfig(**{**ONE.__dict__, "capacity": (0.1,)})
    out = nnx.jit(lambda m, b: m(b))(HNetLM(cfg, seed=5), to_jnp(_batch()))
    assert float(out.metrics["overflow_chunks_s0"]) > 0
    mask = np.asarray(out.target_mask_BxL)
    assert (~mask).sum() > 0 and np.all(np.isfinite(np.asarray(out.logits_BxLxV)))


PAPER = {
    "hnet_1stage_L": 680e6, "hnet_1stage_XL": 1.3e9, "hnet_2stage_L": 870e6, "hnet_2stage_XL": 1.6e9,
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_parameter_counts_by_abstract_init(name, gin_clean):
    """The paper configs' parameter counts (no allocation: nnx.eval_shape) are within 3 % of the paper."""
    from train import config
    from train.restore import query

    config.parse([f"configs/{name}.gin", "configs/runs/default.gin"], [])
    abstract = nnx.eval_shape(query("train.train.model"))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert abs(n / PAPER[name] - 1) < 0.03, (name, n)


def test_lr_modulation_eq11():
    """Eq. 11 values quoted by the spec: 1-stage L [2.63, 0.88]; 2-stage XL [3.03, 1.43, 0.72]."""
    l1 = HNetConfig(arch_layout=("m4", ("T22",), "m4"), d_model=(1024, 1536)).lr_multipliers()
    np.testing.assert_allclose(l1, [2.63, 0.88], atol=0.01)
    xl2 = HNetConfig(arch_layout=("m4", ("T1m4", ("T27",), "m4T1"), "m4"), d_model=(1024, 1536, 2048),
                     ratio_targets=(3.0, 3.0)).lr_multipliers()
    np.testing.assert_allclose(xl2, [3.03, 1.43, 0.72], atol=0.01)
    m = nnx.eval_shape(lambda: HNetLM(TWO))
    assert m.lr_multiplier(("backbone", "encoder", "kernel")) == TWO.lr_multipliers()[0]
    assert m.lr_multiplier(("backbone", "inner", "inner", "main", "kernel")) == TWO.lr_multipliers()[2]


def test_training_compiles_nothing_after_the_first_step_and_eval(tmp_path):
    """Issue #3: no recompilation after the first step. A 6-step H-Net run with an eval every 2 steps
    (steps 2 and 4, plus the final eval and a checkpoint at step 4 and at the end): every jit compilation
    happens before step 3 is logged (train step at step 1, eval and boundary visualisation at step 2)."""
    import logging

    from train import data as data_lib
    from train.loop import train
    from train.optim import OptimizerConfig

    events: list[str] = []

    class Recorder(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith("step "):
                events.append("step")
            elif msg.startswith("Compiling "):
                events.append(msg[:120])

    data = data_lib.DataConfig(sources=("builtin:pydoc_topics",), byte_range=(0.0, 0.9), seq_len=64, batch_size=2)
    ev = data_lib.DataConfig(sources=("builtin:pydoc_topics",), byte_range=(0.9, 1.0), seq_len=64, batch_size=2,
                             shuffle=False, max_windows=3)
    rec = Recorder()
    loggers = [logging.getLogger("jax"), logging.getLogger("hnet")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(rec)
        lg.setLevel(logging.INFO)
    jax.config.update("jax_log_compiles", True)
    try:
        train(str(tmp_path), model=lambda: HNetLM(ONE, seed=0), train_data=data, eval_data=ev,
              optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=1), steps=6, log_every=1, eval_every=2,
              checkpoint_every=4, sample_prompts=())
    finally:
        jax.config.update("jax_log_compiles", False)
        for lg, level in zip(loggers, levels):
            lg.removeHandler(rec)
            lg.setLevel(level)
    assert events.count("step") == 6, events
    third = [i for i, e in enumerate(events) if e == "step"][2]
    assert any(e != "step" for e in events[:third]), "no compilation was recorded at all"
    late = [e for e in events[third:] if e != "step"]
    assert not late, late
