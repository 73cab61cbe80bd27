"""The Python API named in the contract works as written there."""
import unmask


def test_contract_python_api_on_the_embedded_model():
    model = unmask.load(path=None)
    engine = unmask.Engine(model)
    params = unmask.SamplingParams(max_tokens=16, temperature=0.0)
    outs = engine.generate(["def add(a, b):"], params)
    assert outs[0].text == model.tokenizer.decode(outs[0].token_ids, skip_special=True)
    assert 1 <= outs[0].nfe <= 16 and len(outs[0].token_ids) <= 16
    chat = engine.generate([[{"role": "user", "content": "Reverse a string in Python."}]], params)
    assert chat[0].finish_reason in ("stop", "length")
    events = list(engine.stream("import os\n", params))
    assert events[-1].finished and "".join(e.delta for e in events) == events[-1].output.text
    # topk, one token per step (the model's default policy may commit several): the engine reproduces the reference
    topk = engine.generate(["def add(a, b):"], unmask.SamplingParams(max_tokens=16, temperature=0.0, policy="topk"))
    ref = unmask.reference_generate(model, "def add(a, b):", max_tokens=16)
    assert ref.token_ids == topk[0].token_ids
