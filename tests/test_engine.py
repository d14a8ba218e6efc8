import numpy as np
import pytest
import torch
from conftest import make_image
from transformers import Sam3TrackerModel

from backend.errors import BackendError
from backend.sam3.engine import Encoding, EncodingCache, Sam3Engine


def test_checkpoint_loads_both_heads_from_one_folder(engine, checkpoint):
    assert engine.detector is not None and engine.tracker is not None
    # one ViT in memory, shared by both heads
    assert engine.tracker.vision_encoder.backbone is engine.detector.vision_encoder.backbone
    assert engine.image_size == 112


def test_shared_vit_gives_the_trackers_own_embeddings(engine, checkpoint):
    image = make_image(seed=3)
    own = Sam3TrackerModel.from_pretrained(checkpoint).eval()
    px = engine.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = own.get_image_embeddings(px)
    enc = engine._encode([image], ["k"])[0]
    for a, b in zip(expected, enc.tracker):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-6)


def test_cached_encoding_gives_results_identical_to_a_fresh_encode(checkpoint):
    image = make_image(seed=4)
    cached = Sam3Engine(checkpoint, device="cpu").load()
    enc = cached.encode(image)
    cached.segment(enc, [(10, 20)], [1])  # warm it up with another click
    again = cached.encode(image)
    assert again is enc
    mask_warm, score_warm = cached.segment(again, [(30, 12), (5, 5)], [1, 0])
    fresh = Sam3Engine(checkpoint, device="cpu").load()
    mask_fresh, score_fresh = fresh.segment(fresh.encode(image), [(30, 12), (5, 5)], [1, 0])
    assert mask_warm.any()
    assert (mask_warm == mask_fresh).all()
    assert score_warm == score_fresh
    det_warm = cached.detect(again, ["cat"], threshold=0.0)[0]
    det_fresh = fresh.detect(fresh.encode(image), ["cat"], threshold=0.0)[0]
    assert np.array_equal(det_warm.masks, det_fresh.masks)
    assert np.allclose(det_warm.scores, det_fresh.scores, atol=1e-6)


def test_warm_clicks_do_not_run_the_vit(checkpoint):
    eng = Sam3Engine(checkpoint, device="cpu").load()
    image = make_image(seed=5)
    enc = eng.encode(image)
    assert eng.vit_passes == 1
    for x in range(0, 60, 10):
        eng.segment(eng.encode(image), [(x, 20)], [1])
    eng.detect(eng.encode(image), ["dog", "cat"], threshold=0.0)
    assert eng.vit_passes == 1
    eng.encode(make_image(seed=6))
    assert eng.vit_passes == 2
    assert eng.encode(image) is enc


def test_single_click_picks_best_of_three_masks_and_box_gives_one_object(engine):
    """The engine's answer to one click is the one of SAM's three masks with the highest predicted IoU, checked
    against the tracker asked directly, on clicks where that best one is not simply the first."""
    from backend.sam3.engine import upsample

    enc = engine.encode(make_image(seed=7))
    checked = 0
    for x, y in [(20, 20), (5, 40), (60, 5), (33, 24), (10, 10), (50, 30), (2, 2), (62, 46)]:
        inputs = engine.tracker_processor(images=None, input_points=[[[[float(x), float(y)]]]], input_labels=[[[1]]],
                                          original_sizes=[[48, 64]], return_tensors="pt")
        with torch.inference_mode():
            out = engine.tracker(image_embeddings=enc.tracker, input_points=inputs["input_points"],
                                 input_labels=inputs["input_labels"], multimask_output=True)
        iou = out.iou_scores[0, 0].float()
        assert iou.shape == (3,)
        best = int(iou.argmax())
        candidates = upsample(out.pred_masks[0, 0].float(), 48, 64, 0.5)
        if best == 0 or np.array_equal(candidates[best], candidates[0]):
            continue  # a click where the first mask would do as well: no test of the choice
        mask, score = engine.segment(enc, [(x, y)], [1])
        assert np.array_equal(mask, candidates[best]) and score == pytest.approx(float(iou[best].clamp(0, 1)))
        checked += 1
    assert checked >= 1  # at least one click where picking the first mask would have been wrong
    box_mask, _ = engine.segment(enc, [(20, 20)], [1], box=(5, 5, 40, 40))
    assert box_mask.shape == (48, 64)


def test_batched_text_decode_equals_prompting_one_by_one(engine):
    enc = engine.encode(make_image(seed=8))
    prompts = ["cat", "red car", "a dog on grass"]
    together = engine.detect(enc, prompts, threshold=0.0)
    for prompt, batched in zip(prompts, together):
        alone = engine.detect(enc, [prompt], threshold=0.0)[0]
        assert len(alone) == len(batched) == 8  # the tiny model has 8 queries
        assert np.allclose(alone.scores, batched.scores, atol=1e-5)
        assert np.array_equal(alone.masks, batched.masks)
        assert batched.labels == [prompt] * 8


def test_text_threshold_filters_and_sorts(engine):
    enc = engine.encode(make_image(seed=8))
    every = engine.detect(enc, ["cat"], threshold=0.0)[0]
    assert list(every.scores) == sorted(every.scores, reverse=True)
    cut = float(np.median(every.scores))
    kept = engine.detect(enc, ["cat"], threshold=cut)[0]
    assert 0 < len(kept) < len(every)
    assert (kept.scores > cut).all()


def test_cache_is_bounded_by_bytes_and_evicts_least_recent():
    cache = EncodingCache(max_bytes=250)
    for k in "abc":
        cache.put(Encoding(k, 1, 1, None, [], 100))
    assert len(cache) == 2 and "a" not in cache and cache.total == 200
    cache.get("b")  # b is now more recent than c
    cache.put(Encoding("d", 1, 1, None, [], 100))
    assert "b" in cache and "c" not in cache and "d" in cache
    cache.put(Encoding("huge", 1, 1, None, [], 1000))  # larger than the whole cache: not kept
    assert "huge" not in cache and cache.total == 200


def test_a_waiting_click_goes_before_waiting_bulk_work():
    import threading
    import time

    from backend.sam3.engine import PriorityLock

    lock, order = PriorityLock(), []
    holding = threading.Event()

    def bulk_forward(name):
        with lock:
            order.append(name)
            time.sleep(0.05)

    def click():
        with lock.urgent(), lock:
            order.append("click")

    with lock:  # a forward pass is in progress
        holding.set()
        waiting = [threading.Thread(target=bulk_forward, args=(f"bulk{i}",)) for i in range(3)]
        for t in waiting:
            t.start()
        time.sleep(0.1)  # three bulk forwards queue up first
        c = threading.Thread(target=click)
        c.start()
        time.sleep(0.1)
    for t in [*waiting, c]:
        t.join(5)
    assert order[0] == "click" and sorted(order[1:]) == ["bulk0", "bulk1", "bulk2"]
    with lock, lock:  # reentrant in one thread
        pass


def test_a_click_that_extends_the_last_prompt_starts_from_its_mask(engine, monkeypatch):
    enc = engine.encode(make_image(seed=77))
    seen = []
    real = engine.tracker.forward

    def forward(*args, **kwargs):
        seen.append(kwargs.get("input_masks"))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.tracker, "forward", forward)
    engine.segment(enc, [(10, 10)], [1])
    engine.segment(enc, [(10, 10), (30, 20)], [1, 0])  # Label Studio resends the first click with the second
    engine.segment(enc, [(10, 10), (30, 20), (40, 40)], [1, 0, 1])
    engine.segment(enc, [(50, 30), (12, 12)], [1, 1])  # a fresh prompt: nothing to start from
    assert seen[0] is None and seen[3] is None
    first = engine.refinements.get((enc.key, ((10.0, 10.0, 1),), ()))
    assert seen[1] is not None and torch.equal(seen[1][0].float(), first.float())
    assert seen[2] is not None and seen[2].shape == seen[1].shape


def test_auto_dtype_is_bf16_where_the_cpu_has_it_and_can_be_forced(monkeypatch):
    from backend.sam3 import engine as engine_module

    cpu = torch.device("cpu")
    monkeypatch.setattr(engine_module, "cpu_has_bf16", lambda: True)
    assert engine_module.resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(engine_module, "cpu_has_bf16", lambda: False)
    assert engine_module.resolve_dtype("auto", cpu) == torch.float32
    assert engine_module.resolve_dtype("bfloat16", cpu) == torch.bfloat16  # SAM3_DTYPE forces either
    assert engine_module.resolve_dtype("float32", cpu) == torch.float32
    with pytest.raises(BackendError, match="SAM3_DTYPE"):
        engine_module.resolve_dtype("int8", cpu)


def test_bf16_and_fp32_image_features_agree(checkpoint, engine):
    """What the ViT makes of an image is the same in both dtypes. The masks of random weights are not a fair
    check (their logits sit within bf16's rounding of the threshold): bench/dtypes.py measures the full-size
    model's masks, README "bf16 on the CPU"."""
    bf16 = Sam3Engine(checkpoint, device="cpu", dtype="bfloat16").load()
    assert bf16.dtype == torch.bfloat16 and bf16.detector.dtype == torch.bfloat16
    image = make_image(96, 72, seed=9)
    a = engine.encode(image).vision.last_hidden_state.float().flatten()
    b = bf16.encode(image).vision.last_hidden_state.float().flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.999
    mask, score = bf16.segment(bf16.encode(image), [(20, 20)], [1])  # the whole click path runs in bf16
    assert mask.shape == (72, 96) and 0 <= score <= 1
