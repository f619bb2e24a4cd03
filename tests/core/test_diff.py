"""Laws of core.diff.plan over trees held in memory."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from harmonicd.core.codec import delta_compress, delta_decompress
from harmonicd.core.diff import plan, reachable
from harmonicd.core.objects import BLOB, RECIPE, TREE
from tests.core.helpers import FAST, MemoryStore, build, spec_pairs, specs

_RANK = {TREE: 0, RECIPE: 1, BLOB: 2}


def _setup(a_spec: Any, b_spec: Any) -> tuple[MemoryStore, bytes, bytes, set[bytes], set[bytes]]:
    sender = MemoryStore()
    a = build(sender, a_spec)
    b = build(sender, b_spec)
    return sender, a, b, reachable(sender, [a]), reachable(sender, [b])


def _check_plan(sender: MemoryStore, wants: list[Any], receiver_has: set[bytes]) -> None:
    ids = [w.id for w in wants]
    assert len(ids) == len(set(ids)), "an object is planned twice"
    assert not set(ids) & receiver_has, "plan lists an object the receiver already holds"
    for w in wants:
        kind, payload = sender.get(w.id)
        assert kind == w.kind
        if kind != TREE:
            assert w.size == len(payload)
        if w.base is not None:
            assert w.base in receiver_has, "a delta base the receiver does not hold"
    ranks = [_RANK[w.kind] for w in wants]
    assert ranks == sorted(ranks), "trees, then recipes, then blobs"


@FAST
@given(spec_pairs())
def test_plan_a_to_b_gives_everything_b_needs(pair: Any) -> None:
    sender, a, b, reach_a, reach_b = _setup(*pair)
    wants = plan(sender, [(b, a)], known=reach_a)
    _check_plan(sender, wants, reach_a)
    receiver = sender.copy_of(reach_a)
    for w in wants:
        receiver.objects[w.id] = sender.get(w.id)
    assert reach_b <= set(receiver.objects)
    assert reachable(receiver, [b]) == reach_b
    # Exactly what is needed: nothing B does not reach.
    assert {w.id for w in wants} == reach_b - reach_a


@FAST
@given(spec_pairs())
def test_deltas_against_planned_bases_rebuild_the_blob(pair: Any) -> None:
    sender, a, b, reach_a, _ = _setup(*pair)
    for w in plan(sender, [(b, a)], known=reach_a):
        if w.base is None or w.kind != BLOB:
            continue
        _k, base = sender.get(w.base)
        _k, target = sender.get(w.id)
        assert delta_decompress(base, delta_compress(base, target), len(target), what="t") == target


@FAST
@given(specs)
def test_plan_a_to_a_is_empty(spec: Any) -> None:
    sender = MemoryStore()
    a = build(sender, spec)
    known = reachable(sender, [a])
    assert plan(sender, [(a, a)], known=known) == []
    assert plan(sender, [(a, None)], known=known) == []


@FAST
@given(spec_pairs(), st.data())
def test_plan_never_lists_what_the_receiver_holds(pair: Any, data: st.DataObject) -> None:
    sender, a, b, reach_a, reach_b = _setup(*pair)
    # Loose objects from an unfinished transfer: any subset of B's objects.
    held = set(data.draw(st.lists(st.sampled_from(sorted(reach_b)), unique=True)))
    wants = plan(sender, [(b, a)], known=reach_a, held=held)
    _check_plan(sender, wants, reach_a | held)
    assert {w.id for w in wants} == reach_b - reach_a - held


@FAST
@given(spec_pairs())
def test_old_tree_unknown_to_the_sender_sends_everything(pair: Any) -> None:
    full, a, b, _reach_a, reach_b = _setup(*pair)
    sender = full.copy_of(reach_b)  # the sender no longer has the receiver's old tree
    wants = plan(sender, [(b, a)], known=set())
    _check_plan(sender, wants, set())
    assert {w.id for w in wants} == reach_b
    assert all(w.base is None for w in wants)


@FAST
@given(spec_pairs())
def test_old_root_given_but_nothing_known_sends_everything(pair: Any) -> None:
    """The sender has A but the receiver's known set is empty (it lost A): never less."""
    sender, a, b, _reach_a, reach_b = _setup(*pair)
    wants = plan(sender, [(b, a)], known=set())
    _check_plan(sender, wants, set())
    assert {w.id for w in wants} == reach_b


@FAST
@given(spec_pairs(), specs)
def test_several_roots_share_objects_once(pair: Any, c_spec: Any) -> None:
    sender, a, b, reach_a, reach_b = _setup(*pair)
    c = build(sender, c_spec)
    reach_c = reachable(sender, [c])
    wants = plan(sender, [(b, a), (c, None)], known=reach_a)
    _check_plan(sender, wants, reach_a)
    assert {w.id for w in wants} == (reach_b | reach_c) - reach_a


def test_reachable_counts_shared_subtrees_once() -> None:
    s = MemoryStore()
    sub = {"x": b"1", "y": [b"ab", b"cd"]}
    root = build(s, {"one": sub, "two": sub, "f": b"1"})
    ids = reachable(s, [root])
    # root, the shared folder, blob "1", the recipe and its two chunks
    assert len(ids) == 6
