"""SparseAdamW's window: a code left unchosen longer than `window` steps catches up on at most
`window` of the zero-gradient updates dense AdamW gives it; the rest of its momentum tail is cut."""

import torch

from revq_pipe.pipeline.train.codebook_optim import SparseAdamW

LR = 0.05


def train_side_by_side(unchosen_steps: int, window: int | None = None):
    """Dense torch AdamW and SparseAdamW on one position with two codes: both codes get gradient
    at step 1, then only code 0 for `unchosen_steps` steps, then `flush`.

    Returns the sparse optimizer, the dense parameter and optimizer, and code 1's dense position
    after every step (index s: after step s; index 0: the start). `window` None: SparseAdamW's default."""
    generator = torch.Generator().manual_seed(0)
    dense = torch.nn.Parameter(torch.randn(1, 2, 2, generator=generator))
    sparse = torch.nn.Parameter(dense.detach().clone())
    adamw = torch.optim.AdamW([dense], lr=LR, weight_decay=0.0)
    opt = SparseAdamW(sparse, lr=LR, **({} if window is None else {"window": window}))
    code_1_path = [dense.detach()[0, 1].clone()]
    for step in range(1 + unchosen_steps):
        ids = torch.tensor([[0], [1]]) if step == 0 else torch.tensor([[0]])
        token_grads = torch.randn(len(ids), 1, 2, generator=generator) * 0.1  # norm below 1: no clipping
        dense.grad = torch.zeros_like(dense).index_put_((torch.zeros_like(ids), ids), token_grads, accumulate=True)
        adamw.step()
        opt.apply(ids, token_grads)
        code_1_path.append(dense.detach()[0, 1].clone())
    opt.flush()
    return opt, sparse, dense, adamw, code_1_path


def test_flush_applies_exactly_window_steps_of_the_tail_and_decays_the_moments_fully():
    window, unchosen = 5, 30
    opt, sparse, dense, adamw, code_1_path = train_side_by_side(unchosen, window)
    # Code 1 stops where dense AdamW had it `window` steps after its last gradient (step 1) ...
    torch.testing.assert_close(sparse.detach()[0, 1], code_1_path[1 + window], rtol=0, atol=1e-6)
    # ... which is not where dense AdamW ends: the steps beyond the window are what is cut.
    cut = code_1_path[1 + unchosen] - code_1_path[1 + window]
    assert cut.abs().min() > 1e-4
    torch.testing.assert_close(dense.detach()[0, 1] - sparse.detach()[0, 1], cut, rtol=0, atol=1e-6)
    # The moments are not truncated: they decay over every missed step, as dense AdamW's do.
    state = adamw.state[dense]
    torch.testing.assert_close(opt.exp_avg, state["exp_avg"], rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(opt.exp_avg_sq, state["exp_avg_sq"], rtol=1e-5, atol=1e-14)
    # Code 0, chosen at every step, follows dense AdamW.
    torch.testing.assert_close(sparse.detach()[0, 0], dense.detach()[0, 0], rtol=0, atol=1e-6)


def test_with_the_default_window_a_code_unchosen_longer_lands_within_a_thousandth_of_lr():
    """The default window (100) cuts a tail whose terms are below 1e-4 of the first: a code left
    unchosen for 150 steps ends within 1e-3 * lr of dense AdamW's position, per coordinate."""
    opt, sparse, dense, _, code_1_path = train_side_by_side(150)
    assert opt.window == 100  # the default the tolerance is stated for
    gap = (sparse.detach()[0, 1] - dense.detach()[0, 1]).abs()
    moved = (code_1_path[-1] - code_1_path[1]).abs()  # dense AdamW's whole zero-gradient drift
    assert gap.max() < 1e-3 * LR
    assert (gap > 0).all() and (gap < 1e-3 * moved).all()
