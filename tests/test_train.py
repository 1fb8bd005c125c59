"""MAC training on CPU with a tiny random LM, the article split, and SQuAD EM/F1."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from knowstream.models import train as train_mod
from knowstream.models.encoder import load_encoder
from knowstream.models.evaluate import (
    bootstrap_ci,
    comparisons,
    exact_match,
    f1_score,
    normalize_answer,
    parse_mode,
    squad_scores,
    wrong_passages,
)
from knowstream.models.inference import chat_prompts, generate, prefix_cache
from knowstream.models.lm import _cache_is_valid, default_cache_dir, gguf_path
from knowstream.models.mac import MAC, MACConfig
from knowstream.models.objectives import kl_per_token
from knowstream.models.qa_data import QA, load_qa, load_split, make_split, select
from knowstream.models.retrieve import coverage, rank_chunks, retrieve, top_docs

SAMPLE = "data/sample/questions.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's tokenizer (chat template included), from the LM cache if there
    is one, else read from the GGUF file (no weights are de-quantized)."""
    cache = default_cache_dir()
    if _cache_is_valid(cache):
        return AutoTokenizer.from_pretrained(cache)
    g = gguf_path()
    return AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)


def tiny_lm_and_mac(tokenizer) -> tuple[LlamaForCausalLM, MAC]:
    """A frozen, randomly initialized 2-layer Llama with SmolLM2's vocabulary and
    grouped-query attention (4 heads, 2 key/value heads), and untrained MAC networks
    shaped for it (dropout 0, the MACConfig default)."""
    torch.manual_seed(0)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        )
    ).eval()
    lm.requires_grad_(False)
    cfg = MACConfig(
        n_tokens=4, d_lm=64, n_layers_lm=2, n_kv_heads=2, head_dim=16, prefix_len=2,
        d_model=32, n_heads=4, mlp_hidden=64, token_hidden=8,
    )  # fmt: skip
    return lm, MAC.init(cfg)


def tiny_config(**kw) -> train_mod.TrainConfig:
    base = dict(
        device="cpu", max_minutes=3.0, batch_docs=4, q_per_doc=2, curriculum="1,2", lr=1e-2,
        lora_lr=1e-2, min_lr_frac=0.3, warmup_steps=1, log_every=1, dropout=0.0,
    )  # fmt: skip
    return train_mod.TrainConfig(**{**base, **kw})


def test_tiny_training_run_lowers_the_loss(tokenizer):
    lm, mac = tiny_lm_and_mac(tokenizer)
    records = load_qa(SAMPLE)[:8]
    cfg = tiny_config(max_steps=40)
    seen = []
    m = train_mod.train(
        mac, lm, tokenizer, load_encoder(), records, [], None, cfg, lambda _: 0,
        on_step=lambda step, done: seen.append((step, done)),
    )  # fmt: skip
    assert [s for s, _ in seen] == list(range(1, 41)) and seen[-1][1] >= 1.0  # progress
    losses = [r["loss"] for r in m["train"]]
    assert m["steps"] == 40 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    # Both halves of the objective are there: distillation and the gold answers.
    assert {"kd", "gold_nll", "teacher_nll"} <= set(m["train"][0])
    # Grads never reach the frozen LM.
    assert all(p.grad is None for p in lm.parameters())


def test_a_batch_with_a_non_finite_gradient_is_skipped_and_counted(tokenizer, monkeypatch):
    lm, mac = tiny_lm_and_mac(tokenizer)
    real, calls = train_mod.step_losses, []

    def overflow_on_step_2(*args):
        out = real(*args)
        calls.append(1)
        if len(calls) == 2:
            out["loss"] = out["loss"] * float("inf")
        return out

    monkeypatch.setattr(train_mod, "step_losses", overflow_on_step_2)
    cfg = tiny_config(max_steps=4)
    m = train_mod.train(mac, lm, tokenizer, load_encoder(), load_qa(SAMPLE)[:8], [], None, cfg)
    assert m["skipped_steps"] == 1
    assert [r["skipped_steps"] for r in m["train"]] == [0, 1, 1, 1]
    assert all(torch.isfinite(p).all() for p in mac.parameters())


def test_bank_select_goes_into_the_saved_config_and_defaults_to_the_mac_configs():
    assert tiny_config().mac_config().bank_select == MACConfig().bank_select == "all"
    assert tiny_config(bank_select="lm").mac_config().bank_select == "lm"


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
    a = torch.randn(5, 11)
    assert torch.allclose(kl_per_token(a, a), torch.zeros(5), atol=1e-6)
    b = a.clone()
    b[:, 0] += 3.0
    assert (kl_per_token(a, b) > 0).all()


def test_task_prompt_and_encoder_lora_are_trained_and_saved(tokenizer, tmp_path):
    lm, _ = tiny_lm_and_mac(tokenizer)
    cfg = tiny_config(max_steps=6, task_len=2, prefix_len=3, encoder_lora_rank=2)
    mac_cfg = MACConfig(
        n_tokens=4, d_lm=64, n_layers_lm=2, n_kv_heads=2, head_dim=16, prefix_len=3, task_len=2,
        d_model=32, n_heads=4, mlp_hidden=64, token_hidden=8, encoder_lora_rank=2,
    )  # fmt: skip
    mac = MAC.init(mac_cfg)
    before_task = mac.expansion.task.detach().clone()
    before_b = {k: v.detach().clone() for k, v in mac.amortizer.lora.b.items()}
    records = load_qa(SAMPLE)[:8]
    train_mod.train(mac, lm, tokenizer, load_encoder(), records, [], None, cfg, lambda _: 0)
    assert not torch.equal(mac.expansion.task, before_task)
    assert any(not torch.equal(mac.amortizer.lora.b[k], v) for k, v in before_b.items())
    # The prefix is task prompt + memory: P = 3 per layer, of which 2 are the same
    # for every question.
    pairs = mac.expansion.key_values(torch.randn(2, 4, 64))
    assert pairs[0][0].shape == (2, 2, 3, 16)
    assert torch.equal(pairs[0][0][0, :, :2], pairs[0][0][1, :, :2])
    mac.save(tmp_path / "ck")
    again = MAC.load(tmp_path / "ck")
    assert again.version == mac.version and again.config.task_len == 2


def test_task_only_training_leaves_the_memory_networks_alone(tokenizer):
    lm, _ = tiny_lm_and_mac(tokenizer)
    cfg = tiny_config(max_steps=5, train_mac=False, task_len=2, prefix_len=4)
    mac = MAC.init(
        MACConfig(
            n_tokens=4, d_lm=64, n_layers_lm=2, n_kv_heads=2, head_dim=16, prefix_len=4,
            task_len=2, d_model=32, n_heads=4, mlp_hidden=64, token_hidden=8,
        )
    )  # fmt: skip
    amortizer = {k: v.clone() for k, v in mac.amortizer.state_dict().items()}
    task = mac.expansion.task.detach().clone()
    m = train_mod.train(mac, lm, tokenizer, None, load_qa(SAMPLE)[:8], [], None, cfg, lambda _: 0)
    assert m["n_trained_params"] == task.numel()
    assert not torch.equal(mac.expansion.task, task)
    assert all(torch.equal(v, mac.amortizer.state_dict()[k]) for k, v in amortizer.items())


def test_frozen_task_prompt_stays_and_focused_kd_still_trains_the_memory(tokenizer):
    lm, _ = tiny_lm_and_mac(tokenizer)
    cfg = tiny_config(max_steps=6, task_len=2, prefix_len=3, freeze_task=True, kd_focus=1.0)
    mac = MAC.init(
        MACConfig(
            n_tokens=4, d_lm=64, n_layers_lm=2, n_kv_heads=2, head_dim=16, prefix_len=3,
            task_len=2, d_model=32, n_heads=4, mlp_hidden=64, token_hidden=8,
        )
    )  # fmt: skip
    task = mac.expansion.task.detach().clone()
    amortizer = {k: v.clone() for k, v in mac.amortizer.state_dict().items()}
    m = train_mod.train(
        mac, lm, tokenizer, load_encoder(), load_qa(SAMPLE)[:8], [], None, cfg, print
    )
    assert torch.equal(mac.expansion.task, task)
    assert m["n_trained_params"] == m["n_params"] - task.numel()
    assert any(not torch.equal(v, mac.amortizer.state_dict()[k]) for k, v in amortizer.items())
    assert all(torch.isfinite(torch.tensor(r["kd"])) for r in m["train"])


def test_kd_weights_favour_tokens_the_passage_changes():
    teacher = torch.randn(4, 11)
    closed = teacher.clone()
    closed[2, 0] += 5.0  # only token 2 differs without the passage
    w = train_mod.kd_weights(teacher, closed, 1.0)
    assert w.argmax() == 2 and torch.isclose(w.mean(), torch.tensor(1.0))
    assert torch.allclose(train_mod.kd_weights(teacher, closed, 0.0), torch.ones(4))


def test_overrides_parse_to_the_field_types():
    cfg = train_mod.parse_overrides(
        ["--max_steps=7", "--lr=0.5", "--train_mac=false", "--extra=a,b"], train_mod.TrainConfig()
    )
    assert (cfg.max_steps, cfg.lr, cfg.train_mac, cfg.extra) == (7, 0.5, False, "a,b")
    with pytest.raises(SystemExit):
        train_mod.parse_overrides(["--nope=1"], train_mod.TrainConfig())


def test_bank_puts_gold_first_and_distractors_from_the_batch():
    entries = torch.arange(5.0)[:, None, None].expand(5, 1, 1)
    bank, mask = train_mod.mixed_bank(entries, owner=[0, 0, 3], size=3, contexts=[None] * 3)
    assert bank[:, :, 0, 0].tolist() == [[0, 1, 2], [0, 1, 2], [3, 4, 0]] and mask.all()


def test_curriculum_grows_the_bank():
    sizes = [1, 2, 4, 8, 16]
    got = [train_mod.bank_size_at(p / 100, sizes, 0.5) for p in range(0, 101, 10)]
    assert got == [1, 2, 4, 8, 16, 16, 16, 16, 16, 16, 16]


def test_split_is_by_article_and_committed_lists_are_disjoint():
    records = load_qa(SAMPLE)
    split = make_split(records, n_eval=1, n_validation=1)
    assert split == make_split(list(reversed(records)), n_eval=1, n_validation=1)
    sets = [set(split[k]) for k in ("train", "validation", "eval")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    committed = load_split("data/splits/squad_v1.1.json")
    assert [len(committed[k]) for k in ("train", "validation", "eval")] == [34, 4, 10]
    assert not set(committed["eval"]) & set(committed["train"] + committed["validation"])
    assert len(select(records, sets[2] and split["eval"])) > 0


def test_loader_reads_gzip(tmp_path):
    import gzip

    rows = [json.loads(line) for line in open(SAMPLE)][:3]
    with gzip.open(tmp_path / "q.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    assert load_qa(tmp_path / "q.jsonl.gz") == load_qa(SAMPLE)[:3]


def test_wrong_passage_is_another_article():
    records = load_qa(SAMPLE)
    title = {r.doc_id: r.title for r in records}
    for r, w in zip(records, wrong_passages(records, seed=0), strict=True):
        assert len(w) == 1 and title[w[0]] != r.title
    # k controls: k distinct passages, all from other articles, drawn from the pool
    pool = sorted(title)[:60]
    for r, ws in zip(records, wrong_passages(records, seed=1, k=3, pool=pool), strict=True):
        assert len(set(ws)) == 3 and set(ws) <= set(pool)
        assert all(title[w] != r.title for w in ws)


def test_modes_parse_and_pair_with_their_controls():
    assert parse_mode("mac@5") == ("mac", 5)
    assert parse_mode("mac_wrong") == ("mac_wrong", 0)
    assert parse_mode("mac_wrong@10") == ("mac_wrong", 10)
    assert parse_mode("closed_book") == ("closed_book", 0)
    for bad in ("rag", "mac", "closed_book@3", "rag@0", "rag@x", "nope@1"):
        with pytest.raises(ValueError):
            parse_mode(bad)
    per_q = {
        m: np.full(4, f)
        for m, f in (("mac@3", 9.0), ("mac_wrong@3", 8.0), ("mac+rag@3", 40.0), ("rag@3", 10.0))
    }
    pairs = comparisons(per_q, seed=0)
    assert pairs["mac@3 - mac_wrong@3"]["mean"] == pytest.approx(1.0)
    assert pairs["mac+rag@3 - rag@3"]["mean"] == pytest.approx(30.0)
    assert "mac+rag@3 - mac+rag_wrong@3" not in pairs  # its control was not run
    assert parse_mode("mac+rag_gold@3") == ("mac+rag_gold", 3)
    with pytest.raises(ValueError):
        parse_mode("mac+rag_gold")  # it reads retrieved chunks: it needs @k
    per_q = {"mac+rag_gold@3": np.full(4, 7.0), "mac+rag_wrong@3": np.full(4, 4.0)}
    pairs = comparisons(per_q, seed=0)
    assert pairs["mac+rag_gold@3 - mac+rag_wrong@3"]["mean"] == pytest.approx(3.0)


def test_retrieval_ranks_pipeline_chunks_of_the_split():
    records = [r for r in load_qa(SAMPLE) if r.title in ("Super_Bowl_50", "Oxygen")][:40]
    result = retrieve(records, load_encoder(), top=10)
    texts = {r.doc_id: r.text for r in records}
    for doc_id, chunk in result["chunks"]:
        assert chunk and chunk in texts[doc_id]  # a span of its passage, never rewritten
    hits = {q: [result["chunks"][j] for j in idx] for q, idx in result["hits"].items()}
    assert set(hits) == {r.question_id for r in records}
    # distinct documents in rank order, and the gold passage usually among the first 5
    found = [r.doc_id in top_docs(hits[r.question_id], 5) for r in records]
    assert sum(found) >= 0.8 * len(records)
    assert top_docs([("a", "x"), ("a", "y"), ("b", "z")], 2) == ["a", "b"]


def test_coverage_separates_the_entry_from_the_prompt():
    qa = [QA("a", "A", "", "q1", ("4821",), "q1"), QA("b", "B", "", "q2", ("April",), "q2")]
    hits = {
        "q1": [("a", "the vault sits under the mill"), ("c", "x"), ("a", "its code is 4821")],
        "q2": [("c", "floods in April"), ("b", "the delta")],
    }
    # q1: its document is in the bank from k = 1, the chunk with its answer only at k = 3;
    # q2: its answer is in another document's chunk (the prompt has it, the bank does not)
    assert coverage(qa, hits, 1) == {"gold_entry": 0.5, "answer_in_prompt": 0.5, "entry_only": 0.5}
    assert coverage(qa, hits, 2) == {"gold_entry": 1.0, "answer_in_prompt": 0.5, "entry_only": 0.5}
    assert coverage(qa, hits, 3) == {"gold_entry": 1.0, "answer_in_prompt": 1.0, "entry_only": 0.0}


def test_squad_normalization_and_scores():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert exact_match("the Denver Broncos.", "Denver Broncos") == 1.0
    assert exact_match("Broncos", "Denver Broncos") == 0.0
    # precision 1/1, recall 1/2 -> F1 2/3
    assert f1_score("Broncos", "Denver Broncos") == pytest.approx(2 / 3)
    # precision 2/4, recall 2/2 -> F1 2/3
    assert f1_score("the Denver Broncos won easily", "Denver Broncos") == pytest.approx(2 / 3)
    assert f1_score("Carolina", "Denver Broncos") == 0.0
    assert f1_score("", "Denver Broncos") == 0.0
    # max over the references
    assert squad_scores("Santa Clara", ["Levi's Stadium", "Santa Clara, California"]) == (
        0.0,
        pytest.approx(0.8),
    )
    lo, hi = bootstrap_ci(torch.tensor([0.0, 1.0] * 50).numpy())
    assert lo < 0.5 < hi


def test_tiny_lm_learns_answers_that_only_the_memory_holds(tokenizer):
    # Every document answers the *same* question differently, so the prompt alone cannot
    # tell the answers apart: after training, the LM must answer each document's question
    # right from that document's entry, and not from another document's.
    lm, mac = tiny_lm_and_mac(tokenizer)
    words = ["apple", "river", "stone", "cloud"]
    question = "What is the secret word?"
    records = [
        QA(f"doc-{w}", f"t-{w}", f"The secret word of this note is {w}.", question, (w,), w)
        for w in words
    ]
    cfg = tiny_config(
        max_steps=150, q_per_doc=1, curriculum="1", min_lr_frac=0.1, warmup_steps=5, log_every=10
    )
    encoder = load_encoder()
    train_mod.train(mac, lm, tokenizer, encoder, records, [], None, cfg, lambda _: 0)
    mac.eval()
    with torch.no_grad():
        entries = mac.amortizer.amortize_texts(encoder, [r.text for r in records])
        q_states, q_mask = encoder.encode([question] * len(words))
        prompts = chat_prompts(tokenizer, [question] * len(words))

        def answers(order: list[int]) -> list[str]:
            summary = mac.aggregator(q_states, q_mask, entries[order][:, None])
            cache = prefix_cache(mac, summary, lm.dtype)
            return generate(lm, tokenizer, prompts, cache, mac.config.prefix_len, max_new_tokens=4)

    assert answers([0, 1, 2, 3]) == words  # each entry's own answer
    shifted = answers([1, 2, 3, 0])  # the entry of another document
    assert shifted == words[1:] + words[:1]


def test_synthetic_facts_are_answerable_only_from_their_passage():
    from knowstream.models import synthetic

    records, split = synthetic.generate(30, 5, 5, seed=1)
    assert [len(split[k]) for k in ("train", "validation", "eval")] == [30, 5, 5]
    assert len({r["doc_id"] for r in records}) == 40
    for r in records:
        answer = r["answers"][0]
        assert r["text"][r["answer_starts"][0] :].startswith(answer)
        name = next(w for w in r["question"].rstrip("?").split()[1:] if w[0].isupper())
        fact = [s for s in r["text"].split(". ") if name in s]
        assert len(fact) == 1 and answer in fact[0]  # one fact sentence, holding the answer
    # Scored by kind: the gold value (any case, a final period) is a hit, another one is not.
    preds = {r["question_id"]: r["answers"][0].upper() + "." for r in records[:20]}
    preds |= {r["question_id"]: "Oslo" for r in records[20:] if r["answers"][0] != "Oslo"}
    table = synthetic.by_kind(records, {"mac_gold": preds})["mac_gold"]
    scored = [r for r in records if r["question_id"] in preds]
    assert set(table) == {r["kind"] for r in scored} <= {"code", "city", "metal"}
    for kind, (em, n) in table.items():
        of_kind = [r for r in scored if r["kind"] == kind]
        right = [r for r in of_kind if r in records[:20]]
        assert n == len(of_kind) and em == pytest.approx(100 * len(right) / n)


def test_untrained_encoder_lora_is_the_frozen_encoder_and_gets_gradients():
    encoder = load_encoder()
    texts = ["The bridge was built in 1871 by Ada Smith.", "Paris is the capital of France."]
    base = MAC.init(MACConfig(seed=3))
    lora = MAC.init(MACConfig(seed=3, encoder_lora_rank=4))
    lora.amortizer.load_state_dict(base.amortizer.state_dict(), strict=False)
    with torch.no_grad():
        a = base.amortizer.amortize_texts(encoder, texts)
        b = lora.amortizer.amortize_texts(encoder, texts)
    assert torch.allclose(a, b, atol=1e-5)  # B = 0 at init: the frozen encoder exactly
    lora.amortizer.amortize_texts(encoder, texts).square().sum().backward()
    grads = [p.grad for p in lora.amortizer.lora.b.values()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    assert all(p.grad is None for p in encoder.model.parameters())  # the encoder stays frozen


def test_self_questions_lose_their_labels_and_keep_only_questions():
    from knowstream.models.selfqa import clean_question, keep_question

    assert clean_question("Example question: Who built it?\nMore") == "Who built it?"
    assert clean_question("Another question: When was it  built?") == "When was it built?"
    assert clean_question("Question 2: Where is the tower?") == "Where is the tower?"
    assert keep_question(clean_question("Who designed the Eiffel Tower?"))
    assert not keep_question(clean_question("I'm ready to assist you."))


def test_mac_rag_prompts_hold_own_passage_and_same_article_neighbours(tokenizer):
    records = load_qa(SAMPLE)
    cfg = tiny_config(rag_frac=1.0, rag_k=3, article_group=3)
    data = train_mod.Batches(records, tokenizer, cfg)
    texts, titles, owner, flat = data.sample(6, 2)
    assert len(set(titles)) == 2 and all(titles.count(t) == 3 for t in titles)
    contexts = data.student_contexts(flat, owner, titles, texts, None)
    for o, c in zip(owner, contexts, strict=True):
        assert c is not None and c.prompt == [texts[d] for d in c.bank]
        assert o in c.bank and len(set(c.bank)) == 3
        assert {titles[d] for d in c.bank} == {titles[o]}
    prompts = data.student_prompts(flat, contexts)
    decoded = [tokenizer.decode(p) for p in prompts]
    for text, c, i in zip(decoded, contexts, flat, strict=True):
        assert c is not None and all(t in text for t in c.prompt)
        assert records[i].question in text
    # The bank of a question with passages is its context's, in order; a question
    # alone gets the gold entry and its in-batch distractors, padding masked.
    entries = torch.arange(6.0)[:, None, None].expand(6, 2, 3)
    with_passages = train_mod.Context(["e", "d", "c"], [5, 4, 3])
    bank, mask = train_mod.mixed_bank(entries, [0, 4], 2, [None, with_passages])
    assert bank[:, :, 0, 0].tolist() == [[0, 1, 0], [5, 4, 3]]
    assert mask.tolist() == [[True, True, False], [True, True, True]]


def test_a_retrieval_miss_leaves_the_own_passage_out_of_the_prompt_not_the_bank(tokenizer):
    records = load_qa(SAMPLE)
    cfg = tiny_config(rag_frac=1.0, rag_k=3, rag_miss=1.0, article_group=4)
    data = train_mod.Batches(records, tokenizer, cfg)
    texts, titles, owner, flat = data.sample(8, 2)
    contexts = data.student_contexts(flat, owner, titles, texts, None)
    prompts = data.student_prompts(flat, contexts)
    for o, c, p, i in zip(owner, contexts, prompts, flat, strict=True):
        assert c is not None and o in c.bank and texts[o] not in c.prompt
        # Its place in the prompt goes to a fourth passage of the same article.
        assert len(c.prompt) == 3 and {titles[texts.index(t)] for t in c.prompt} == {titles[o]}
        assert texts[o] not in tokenizer.decode(p) and records[i].question in tokenizer.decode(p)


def test_retrieved_contexts_are_served_ones_top_chunks_and_documents(tokenizer):
    records = load_qa(SAMPLE)
    cfg = tiny_config(rag_frac=1.0, rag_k=3, rag_retrieve=True, article_group=4)
    data = train_mod.Batches(records, tokenizer, cfg)
    texts, titles, owner, flat = data.sample(8, 2)
    encoder = load_encoder()
    contexts = data.student_contexts(flat, owner, titles, texts, encoder)
    questions = [records[i].question for i in flat]
    # The same hits as evaluation's retrieval over these passages, cut the same way.
    chunks, best = rank_chunks({str(d): t for d, t in enumerate(texts)}, questions, encoder, 20)
    for c, row in zip(contexts, best, strict=True):
        assert c is not None and c.prompt == [chunks[j][1] for j in row[:3]]
        assert c.bank == [int(d) for d in top_docs([chunks[j] for j in row], 3)]
        assert all(any(t in text for text in texts) for t in c.prompt)  # spans, not rewrites
    assert sum(o in c.bank for o, c in zip(owner, contexts, strict=True) if c) >= len(owner) // 2
    # A miss: none of the own passage's chunks in the prompt; the bank is still retrieval's.
    hits = train_mod.retrieved_hits(encoder, questions, texts)
    missed = [train_mod.retrieved_context(h, o, 3, True) for h, o in zip(hits, owner, strict=True)]
    for o, c, m in zip(owner, contexts, missed, strict=True):
        assert c is not None and m.bank == c.bank and len(m.prompt) == 3
        assert not any(t in texts[o] for t in m.prompt)


def test_mac_rag_training_validates_own_against_wrong_entries_with_passages(tokenizer):
    lm, mac = tiny_lm_and_mac(tokenizer)
    records = load_qa(SAMPLE)
    train_recs = [r for r in records if r.title in ("Oxygen", "Black_Death")][:24]
    val_recs = [r for r in records if r.title == "Prime_number"][:12]
    cfg = tiny_config(
        max_steps=3, eval_every=3, rag_frac=0.5, rag_k=3, rag_miss=0.5, article_group=3,
        select="gold+rag_gold",
    )  # fmt: skip
    losses = ("gold", "wrong", "rag_gold", "rag_wrong", "miss_gold", "miss_wrong")
    encoder = load_encoder()
    for retrieved in (False, True):
        cfg.rag_retrieve = retrieved
        m = train_mod.train(mac, lm, tokenizer, encoder, train_recs, val_recs, None, cfg, print)
        v = m["val"][-1]
        assert {f"kd_{k}" for k in losses} <= set(v)
        assert all(np.isfinite(v[k]) for k in losses)
        assert v["select"] == pytest.approx(v["gold"] + v["rag_gold"])
        # Own entries and wrong ones give different losses: the control really swaps
        # entries; and leaving the gold passage out of the prompt changes the loss too.
        assert v["rag_gold"] != v["rag_wrong"] and v["miss_gold"] != v["rag_gold"]
