"""The built-in workloads: the character-level transformer LM and its offline corpus."""
import torch

from osfn_dist import OSFN
from osfn_dist.workloads import get_workload
from osfn_dist.workloads.text import CONTEXT, VOCAB, corpus, encode


def test_corpus_is_offline_text_and_encodes_losslessly_over_the_vocabulary():
    text = corpus()
    assert len(text) > 200_000  # ~0.4 MB of docstrings on Python 3.11
    assert "Return" in text and "argument" in text  # English prose, not code
    sample = "Return the list.\n"
    ids = encode(sample)
    assert "".join(VOCAB[i] for i in ids) == sample
    assert int(encode("é")[0]) == VOCAB.index("?")


def test_char_lm_targets_are_the_inputs_shifted_by_one_and_train_and_test_do_not_overlap():
    work = get_workload("char_lm")
    (x, y), (xt, _) = work.train, work.test
    assert x.shape[1] == CONTEXT and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert x.max() < len(VOCAB)
    train_rows = {tuple(r.tolist()) for r in x}
    assert not any(tuple(r.tolist()) in train_rows for r in xt)


def test_char_lm_is_causal():
    model = get_workload("char_lm").build_model()
    idx = torch.randint(0, len(VOCAB), (2, CONTEXT))
    changed = idx.clone()
    changed[:, -1] = (changed[:, -1] + 1) % len(VOCAB)
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :-1], b[:, :-1], atol=1e-6)  # the future does not leak back
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_char_lm_learns_with_osfn():
    work = get_workload("char_lm", seed=0)
    model = work.build_model()
    assert 50_000 < sum(p.numel() for p in model.parameters()) < 1_000_000
    opt = OSFN(model.parameters(), lr=1e-2)
    start = work.evaluate(model, "train")
    for _, x, y in work.batches(60, seed=0):
        opt.zero_grad()
        work.loss_fn(model(x), y).backward()
        opt.step()
    assert start > 4.0  # ≈ ln 96 at initialisation
    assert work.evaluate(model, "train") < 3.2  # well below uniform: it learned character statistics
