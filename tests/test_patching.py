"""The patch machinery on a throwaway engine: apply, idempotence, revert, skips, isolation."""

import logging

import pytest

from attnplug import Patch, Rebinding
from attnplug.adapters.patching import apply_patches, applied_patch_ids, check_patch, revert_patches
from tests.toy import toy_patch


def test_apply_rebinds_every_binding_and_falls_back_to_original(toy_engine):
    ops, backend = toy_engine
    original = ops.attend
    report = apply_patches([toy_patch()])
    assert report.applied == ["toy.ops.attend"] and report.skipped == {}
    assert ops.attend is backend.attend is not original
    assert backend.run("x") == ("attnplug", "x")  # the from-import copy is rebound too
    assert ops.attend("fallback", 1, 2) == ("stock", "fallback")  # replacement delegates to the original


def test_apply_is_idempotent(toy_engine):
    ops, _ = toy_engine
    apply_patches([toy_patch()])
    first = ops.attend
    again = apply_patches([toy_patch()])
    assert again.results[0].status == "already applied"
    assert ops.attend is first
    assert applied_patch_ids() == ["toy.ops.attend"]


def test_revert_restores_the_exact_original_objects(toy_engine):
    ops, backend = toy_engine
    original = ops.attend
    raw_helper = vars(ops.Backend)["helper"]
    apply_patches(
        [
            toy_patch(),
            toy_patch(
                id="toy.backend.helper",
                targets=("toy_engine.ops:Backend.helper",),
                replacement="tests.toy:make_helper",
                signature=("a",),
            ),
        ]
    )
    assert ops.Backend.helper(1) == ("attnplug helper", 1)
    assert isinstance(vars(ops.Backend)["helper"], staticmethod)  # still a staticmethod
    assert revert_patches() == ["toy.ops.attend", "toy.backend.helper"]
    assert ops.attend is original and backend.attend is original
    assert vars(ops.Backend)["helper"] is raw_helper
    assert applied_patch_ids() == []


def test_inherited_method_is_patched_on_the_subclass_and_reverted_by_deletion(toy_engine):
    ops, _ = toy_engine
    patch = toy_patch(
        id="toy.backend.forward",
        targets=("toy_engine.ops:SubBackend.forward",),
        replacement="tests.toy:make_forward",
        signature=("self", "x"),
    )
    assert apply_patches([patch]).applied == ["toy.backend.forward"]
    assert ops.SubBackend().forward(3) == ("attnplug forward", 3)
    assert ops.Backend().forward(3) == ("stock forward", 3)
    revert_patches()
    assert "forward" not in vars(ops.SubBackend)
    assert ops.SubBackend().forward(3) == ("stock forward", 3)


@pytest.mark.parametrize(
    "overrides, reason",
    [
        (dict(versions="<1"), "outside the supported range '<1'"),
        (dict(versions="<1", upstream_has_it=">=1"), "already has this change upstream (none (test))"),
        (dict(signature=("q", "k")), "has signature (q, k, v), expected (q, k)"),
        (dict(targets=("toy_engine.ops:attend", "toy_engine.gone:attend")), "target toy_engine.gone:attend is missing"),
        (dict(targets=("toy_engine.ops:attend", "toy_engine.ops:nothing")), "target toy_engine.ops:nothing is missing"),
        (dict(targets=("toy_engine.ops:attend", "toy_engine.ops:Backend")), "holds a different object"),
        (dict(engine="ghost", id="ghost.ops.attend"), "unknown engine 'ghost'"),
    ],
)
def test_a_patch_that_cannot_apply_is_skipped_with_one_warning(toy_engine, caplog, overrides, reason):
    ops, backend = toy_engine
    original = ops.attend
    patch = toy_patch(**overrides)
    assert reason in check_patch(patch)
    with caplog.at_level(logging.WARNING, logger="attnplug"):
        caplog.handler.setLevel(logging.WARNING)
        logging.getLogger("attnplug").addHandler(caplog.handler)
        try:
            report = apply_patches([patch])
        finally:
            logging.getLogger("attnplug").removeHandler(caplog.handler)
    assert report.applied == [] and reason in report.skipped[patch.id]
    lines = [r.getMessage() for r in caplog.records if r.name == "attnplug"]
    assert len(lines) == 1 and patch.id in lines[0] and reason in lines[0]
    assert ops.attend is original and backend.attend is original  # nothing half-applied


def test_uninstalled_engine_is_a_skip_not_an_import(toy_engine, monkeypatch):
    from attnplug.adapters.engines import ENGINES, Engine

    monkeypatch.setitem(ENGINES, "toy", Engine("toy", "toy_engine", ("no-such-distribution",)))
    assert apply_patches([toy_patch()]).skipped == {"toy.ops.attend": "toy is not installed"}


def test_one_failing_patch_does_not_stop_the_others(toy_engine):
    ops, _ = toy_engine
    broken = toy_patch(
        id="toy.backend.helper", targets=("toy_engine.ops:Backend.helper",), replacement="tests.toy:make_broken", signature=("a",)
    )
    report = apply_patches([broken, toy_patch()])
    assert report.applied == ["toy.ops.attend"]
    assert report.skipped == {"toy.backend.helper": "RuntimeError: factory exploded"}
    assert ops.attend("q", 1, 2) == ("attnplug", "q")


def test_a_patch_of_several_rebindings_applies_whole_or_not_at_all(toy_engine):
    ops, backend = toy_engine
    original, raw_helper = ops.attend, vars(ops.Backend)["helper"]
    attend, helper = toy_patch().rebinds[0], Rebinding(("toy_engine.ops:Backend.helper",), "tests.toy:make_helper", ("a",))
    both = toy_patch(id="toy.ops.both", rebinds=(attend, helper))
    assert apply_patches([both]).applied == ["toy.ops.both"]
    assert backend.run("q") == ("attnplug", "q") and ops.Backend.helper(1) == ("attnplug helper", 1)
    revert_patches()
    broken = Rebinding(("toy_engine.ops:Backend.forward",), "tests.toy:make_broken", ("self", "x"))
    assert apply_patches([toy_patch(id="toy.ops.half", rebinds=(attend, helper, broken))]).applied == []
    assert ops.attend is original and backend.attend is original and vars(ops.Backend)["helper"] is raw_helper


def test_check_patch_does_not_apply(toy_engine):
    ops, _ = toy_engine
    original = ops.attend
    assert check_patch(toy_patch()) is None
    assert ops.attend is original and applied_patch_ids() == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(id="toy.attend"), "must look like 'toy.<backend>.<what>'"),
        (dict(id="vllm.ops.attend"), "must look like 'toy.<backend>.<what>'"),
        (dict(targets=("toy_engine.ops.attend",)), "targets must be 'module:qualname'"),
        (dict(targets=()), "targets must be 'module:qualname'"),
        (dict(replacement="tests.toy.make_attend"), "replacement must be 'module:factory'"),
        (dict(versions="0.32"), "is not a version specifier"),
        (dict(rebinds=()), "rebinds must name at least one Rebinding"),
    ],
)
def test_malformed_patch_declarations_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.").replace("<", "<")):
        toy_patch(**overrides)


def test_keyword_is_the_last_part_of_the_id():
    assert toy_patch(id="toy.triton_attn.split_launch").keyword == "split_launch"
    assert isinstance(toy_patch(), Patch)
