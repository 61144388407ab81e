import torch

from qscope_train.near_parallel import BF16_MARGIN, ParallelSearch, near_parallel_pairs, search_dtype


def _walk(passes: int, d_sae: int = 600, d_model: int = 32, seed: int = 0):
    """Decoders over a run's passes: a random walk whose steps shrink, with latents re-seeded, dying and
    coming back, and pairs drifting together until they pass the twin cosine."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_sae, d_model, generator=g)
    alive = torch.ones(d_sae, dtype=torch.bool)
    target = torch.randn(8, d_model, generator=g)
    for p in range(passes):
        yield W.clone(), alive.clone()
        W += torch.randn(W.shape, generator=g) * (0.2 / (1 + p)) * W.norm(dim=1, keepdim=True) / d_model**0.5
        W[torch.randint(0, d_sae, (3,), generator=g)] = torch.randn(3, d_model, generator=g)  # re-seeded
        alive ^= torch.rand(d_sae, generator=g) < 0.01  # some die, some come back
        closer = 1 - 0.8 ** (p + 1)  # latents 0-15 drift onto 8 directions, two each
        W[:16] = (1 - closer) * W[:16] + closer * target.repeat_interleave(2, 0)


def test_a_parallel_search_finds_the_full_searchs_pairs_at_every_pass_forming_fewer_rows():
    for cos in (0.95, 0.6):
        search = ParallelSearch()
        for W, alive in _walk(12):
            want = near_parallel_pairs(W, alive, cos, partners=2, chunk=128)
            got = search(W, alive, cos, partners=2, chunk=128)
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b)
        formed, live = zip(*search.formed, strict=True)
        assert formed[0] == live[0]  # nothing known yet: every row
        if cos == 0.95:  # after two passes, most latents' rows are left out
            assert sum(formed[2:]) < 0.5 * sum(live[2:]) and min(f / n for f, n in zip(formed, live, strict=True)) < 0.1
            assert len(want[0]) >= 6  # the drifting latents were found as they came together


def test_a_parallel_search_forms_the_rows_of_latents_that_moved_far_or_came_alive():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(400, 24, generator=g)
    alive = torch.ones(400, dtype=torch.bool)
    alive[390:] = False
    search = ParallelSearch()
    search(W, alive, 0.95)
    W2 = W.clone()
    W2[5] = W2[7] * 1.5  # a latent moved onto another: a twin that only its own row can find
    alive2 = alive.clone()
    alive2[395] = True  # came alive: its row is formed too
    W2[395] = W2[9]
    i, j, _ = search(W2, alive2, 0.95)
    assert {(int(a), int(b)) for a, b in zip(i, j, strict=True)} == {(5, 7), (9, 395)}
    assert search.formed[-1][0] < 40  # the still latents' rows were not formed


def test_a_parallel_search_finds_two_latents_that_came_together_while_every_latent_moved():
    """Latents 1 and 2 (cosine 0.5) each turn 21 degrees toward the other (cosine 0.953); every other latent
    moves further, in a random direction. Neither's bound plus its own move reaches 0.95: only the bound
    on the other's move (D) says that their rows must be formed."""
    g = torch.Generator().manual_seed(3)
    unit = torch.nn.functional.normalize
    W = unit(torch.randn(300, 64, generator=g), dim=1)
    x, y = torch.linalg.qr(torch.randn(64, 2, generator=g)).Q.T
    angle = torch.tensor(torch.pi / 3)
    W[1], W[2] = x, angle.cos() * x + angle.sin() * y
    search, alive = ParallelSearch(), torch.ones(300, dtype=torch.bool)
    assert search(W, alive, 0.95)[0].numel() == 0
    turn = torch.deg2rad(torch.tensor(21.2))
    W = unit(W + 0.45 * unit(torch.randn(300, 64, generator=g), dim=1), dim=1)
    W[1], W[2] = turn.cos() * x + turn.sin() * y, (angle - turn).cos() * x + (angle - turn).sin() * y
    want = near_parallel_pairs(W, alive, 0.95)
    assert want[0].tolist() == [1] and want[1].tolist() == [2]
    for a, b in zip(search(W, alive, 0.95), want, strict=True):
        torch.testing.assert_close(a, b)


def test_pairs_just_above_the_cosine_are_found_with_their_exact_cosine_and_just_below_are_not():
    g = torch.Generator().manual_seed(2)
    u = torch.nn.functional.normalize(torch.randn(80, 256, generator=g), dim=1)
    w = torch.randn(80, 256, generator=g)
    w = torch.nn.functional.normalize(w - (w * u).sum(1, keepdim=True) * u, dim=1)
    c = torch.tensor([0.95 + 1e-4] * 40 + [0.95 - 1e-4] * 40)[:, None]
    W = torch.cat([u, c * u + (1 - c**2).sqrt() * w]) * torch.rand(160, 1, generator=g).add(0.5)
    i, j, cos = near_parallel_pairs(W, torch.ones(160, dtype=torch.bool), 0.95)
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == [(p, p + 80) for p in range(40)]
    torch.testing.assert_close(cos, torch.full((40,), 0.95 + 1e-4), atol=1e-6, rtol=0)


def test_a_full_search_in_chunks_finds_each_latents_most_parallel_partners_and_bounds_its_largest_cosine():
    """Against the dense cosine matrix, formed in the search's dtype: latent i keeps its `partners` most
    parallel later latents at the cosine (any of those tied at the last place), and the bound each pass
    keeps is its largest cosine to any other live latent (plus the rounding margin)."""
    g = torch.Generator().manual_seed(4)
    # 70 clusters of 10 (and the rest spread): many latents have more than `partners` near them
    W = torch.randn(70, 24, generator=g).repeat_interleave(10, 0) + 0.6 * torch.randn(700, 24, generator=g)
    W[::3] = torch.randn(234, 24, generator=g)
    alive = torch.rand(700, generator=g) > 0.1
    unit = torch.nn.functional.normalize(W, dim=1)
    live = alive.nonzero().squeeze(1)
    unit_AD = unit[live].to(search_dtype(W.device))
    dense = (unit_AD @ unit_AD.T).float()
    margin = BF16_MARGIN if unit_AD.dtype == torch.bfloat16 else 0.0
    for cos in (0.5, 0.8):
        search = ParallelSearch()
        i, j, c = search(W, alive, cos, partners=2, chunk=96)  # the first pass forms every row
        got: dict[int, set[int]] = {}
        for a, b in zip(i.tolist(), j.tolist(), strict=True):
            got.setdefault(a, set()).add(b)
        for a in range(live.numel() - 1):
            later = dense[a, a + 1 :]
            cut = max(float(later.topk(min(2, later.numel())).values[-1]), cos - margin)
            exact = (unit[live[a]] @ unit[live[a + 1 :]].T) >= cos
            must = {int(live[a + 1 + t]) for t in ((later > cut) & exact).nonzero().squeeze(1)}
            may = {int(live[a + 1 + t]) for t in ((later >= cut) & exact).nonzero().squeeze(1)}
            assert must <= got.get(int(live[a]), set()) <= may
        capped = sum(int((dense[a, a + 1 :] >= cos).sum()) > 2 for a in range(live.numel()))
        assert capped > 20 and sum(map(len, got.values())) > 100
        torch.testing.assert_close(c, (unit[i] * unit[j]).sum(1))
        assert bool((c[:-1] >= c[1:]).all())
        largest = dense.fill_diagonal_(-2.0).amax(1)
        torch.testing.assert_close(search.bound_F[live], largest + margin, atol=0, rtol=0)
        dense = (unit_AD @ unit_AD.T).float()
