"""SYNAPSE_WORKER_TYPES grammar → declared workers (names, types as written, expanded roles)."""

from __future__ import annotations

import pytest

from synapse_workers import catalog
from synapse_workers.errors import UserError
from synapse_workers.workers import parse_workers


def names(spec: str) -> list[str]:
    return [w.name for w in parse_workers(spec)]


def error(spec: str) -> UserError:
    with pytest.raises(UserError) as info:
        parse_workers(spec)
    text = str(info.value)
    assert "SYNAPSE_WORKER_TYPES" in text
    return info.value


@pytest.mark.parametrize("spec", ["", "   ", ",", " , ,"])
def test_empty_is_a_monolith(spec):
    assert parse_workers(spec) == ()


def test_counts_names_and_types_as_written():
    workers = parse_workers(
        "synchrotron:2, event_persister:2, media_repository, stream_writers=typing+to_device+receipts")
    assert [(w.name, w.types) for w in workers] == [
        ("synchrotron1", ("synchrotron",)),
        ("synchrotron2", ("synchrotron",)),
        ("event_persister1", ("event_persister",)),
        ("event_persister2", ("event_persister",)),
        ("media_repository1", ("media_repository",)),
        ("stream_writers1", ("typing", "to_device", "receipts")),
    ]
    assert workers[-1].roles == ("receipts", "to_device", "typing")
    assert workers[-1].streams == ("receipts", "to_device", "typing")
    assert workers[2].streams == ("events",)
    assert workers[4].streams == ("quarantined_media_changes",)
    assert workers[0].streams == ()


def test_unnamed_merged_worker_is_named_after_its_sorted_types():
    (worker,) = parse_workers("typing+account_data")
    assert worker.name == "account_data+typing1"
    assert worker.types == ("typing", "account_data")
    assert worker.roles == ("account_data", "typing")


def test_counter_is_per_name_not_per_type_string():
    # Seed bug P11: a=pusher, b=pusher gave a1, b2.
    assert names("a=pusher, b=pusher") == ["a1", "b1"]
    assert names("a=pusher:2, b=pusher, a=pusher") == ["a1", "a2", "b1", "a3"]


def test_same_unnamed_item_twice_counts_on():
    assert names("synchrotron, pusher, synchrotron:2") == ["synchrotron1", "pusher1", "synchrotron2", "synchrotron3"]


def test_count_applies_to_the_whole_named_item():
    assert names("bob=pusher:2") == ["bob1", "bob2"]
    assert names("x=typing+presence:1") == ["x1"]


@pytest.mark.parametrize("spec", ["pusher,", "pusher, ", ",pusher", "pusher,,", " pusher ,, "])
def test_trailing_and_doubled_commas_are_tolerated(spec):
    # Seed bug P21: a trailing comma was an unknown-type error.
    assert names(spec) == ["pusher1"]


def test_count_zero_drops_the_item():
    assert names("pusher:0") == []
    assert names("synchrotron:0, pusher") == ["pusher1"]
    assert names("typing:0, typing") == ["typing1"]  # a dropped singleton does not count


def test_whitespace_and_case_are_forgiven():
    workers = parse_workers("  Synchrotron : 2 ,  b = PUSHER + Federation_Sender ")
    assert [(w.name, w.types) for w in workers] == [
        ("synchrotron1", ("synchrotron",)), ("synchrotron2", ("synchrotron",)),
        ("b1", ("pusher", "federation_sender")),
    ]


@pytest.mark.parametrize("count", ["-1", "x", "65", "1.5", "", "2x", "+1"])
def test_bad_counts_are_rejected(count):
    exc = error(f"pusher:{count}")
    assert f"invalid count {count!r}" in str(exc)
    assert "0 to 64" in str(exc)


def test_count_64_is_the_maximum_allowed():
    assert len(parse_workers("pusher:64")) == 64


@pytest.mark.parametrize(
    "word, suggestion",
    [("synchrotorn", "synchrotron"), ("event_persistor", "event_persister"), ("federation_reeder", "federation_reader"),
     ("typng", "typing"), ("ful", "full")],
)
def test_unknown_type_suggests_the_closest(word, suggestion):
    exc = error(f"{word}:2")
    text = str(exc)
    assert f"unknown worker type {word!r}" in text
    assert f"Did you mean {suggestion!r}?" in text


def test_unknown_type_without_close_match_lists_the_known_types():
    text = str(error("zzzzzzzz"))
    assert "Did you mean" not in text
    assert "synchrotron" in text and "media_repository" in text and "full" in text


def test_unknown_type_inside_a_merged_item():
    text = str(error("w=typing+presense"))
    assert "'presense'" in text and "Did you mean 'presence'?" in text


@pytest.mark.parametrize("spec", ["pusher+", "+pusher", "x=", "pusher++typing", "x=:2"])
def test_empty_type_is_rejected(spec):
    assert "empty worker type" in str(error(spec))


def test_type_listed_twice_in_one_item():
    assert "lists pusher more than once" in str(error("pusher+pusher"))


SINGLETONS = ["typing", "to_device", "account_data", "presence", "push_rules", "background_worker", "appservice"]
REPEATABLE = ["event_persister", "receipts", "device_lists", "thread_subscriptions", "federation_sender", "pusher",
              "synchrotron", "media_repository", "user_dir", "federation_inbound", "client_reader", "event_creator"]


@pytest.mark.parametrize("role", SINGLETONS)
def test_singletons_rejected_when_declared_twice(role):
    for spec in (f"{role}:2", f"{role}, {role}", f"a={role}, b={role}", f"a={role}+pusher, b=synchrotron+{role}"):
        text = str(error(spec))
        assert f"{role!r} can run on only one worker" in text, spec
        assert "2 are declared" in text


@pytest.mark.parametrize("role", SINGLETONS)
def test_singletons_once_are_fine(role):
    assert len(parse_workers(f"{role}, pusher")) == 2


@pytest.mark.parametrize("role", REPEATABLE)
def test_sharded_roles_may_repeat(role):
    other = "event_creator" if role != "event_creator" else "pusher"
    assert len(parse_workers(f"{role}:3, x={role}+{other}")) == 4


def test_singleton_through_two_merged_workers():
    text = str(error("sw=typing+to_device, other=typing+receipts"))
    assert "'typing' can run on only one worker" in text and "sw1, other1" in text


def test_all_singleton_problems_are_reported_together():
    exc = error("typing:2, presence:2")
    assert len(exc.problems) == 2


def test_full_expands_to_the_16_seed_workers():
    workers = parse_workers("full")
    assert len(workers) == 16
    assert [w.types[0] for w in workers] == list(catalog.FULL_PRESET)
    assert {w.name for w in workers} == {f"{t}1" for t in catalog.FULL_PRESET}
    assert {t for w in workers for t in w.types} == {
        "account_data", "background_worker", "event_creator", "event_persister", "federation_inbound",
        "federation_reader", "federation_sender", "frontend_proxy", "media_repository", "presence", "pusher",
        "receipts", "to_device", "typing", "synchrotron", "user_dir",
    }
    assert names("FULL") == names("full")


def test_full_combines_with_more_workers():
    workers = names("full, synchrotron, event_persister:2")
    assert len(workers) == 19
    assert "synchrotron2" in workers and "event_persister3" in workers
    assert "'typing' can run on only one worker" in str(error("full, typing"))


@pytest.mark.parametrize(
    "shorthand, roles",
    [
        ("client_reader", ("client_reader_non_room", "client_reader_room")),
        ("federation_reader", ("federation_reader_non_room", "federation_reader_room")),
        ("room_reader", ("client_reader_room", "federation_reader_room")),
        ("general_reader", ("client_reader_non_room", "federation_reader_non_room")),
    ],
)
def test_shorthands_keep_their_name_but_expand_roles(shorthand, roles):
    (worker,) = parse_workers(shorthand)
    assert worker.name == f"{shorthand}1"
    assert worker.types == (shorthand,)
    assert worker.roles == roles


def test_overlapping_shorthands_merge_roles_once():
    (worker,) = parse_workers("r=client_reader+room_reader")
    assert worker.types == ("client_reader", "room_reader")
    assert worker.roles == ("client_reader_non_room", "client_reader_room", "federation_reader_room")


def test_every_role_and_shorthand_is_a_type():
    for name in (*catalog.ROLES, *catalog.SHORTHANDS):
        (worker,) = parse_workers(name)
        assert worker.types == (name,)


def test_one_base_name_for_two_type_lists_is_an_error():
    text = str(error("a=pusher, a=synchrotron"))
    assert "'a'" in text and "two different type lists" in text
    # An unnamed item's base name counts too.
    assert "two different type lists" in str(error("pusher, pusher=synchrotron"))
    # Same types in a different order is the same list.
    assert names("a=typing+presence, b=pusher") == ["a1", "b1"]


def test_same_name_same_types_in_other_order_is_one_base():
    assert names("x=pusher+federation_sender, x=federation_sender+pusher") == ["x1", "x2"]


@pytest.mark.parametrize(
    "name",
    ["worker1", "main", "Main", "master", "MASTER", "a b", "1abc", "_x", "a.b", "a/b", "a:b", "-x", "x y", "tab\tx",
     "ünï"],
)
def test_invalid_names_are_rejected(name):
    text = str(error(f"{name}=pusher"))
    assert "invalid worker name" in text
    assert repr(name.strip()) in text


@pytest.mark.parametrize("name", ["a", "reader", "fed-in", "my_worker", "sw+x", "A", "w2w"])
def test_valid_names(name):
    assert names(f"{name}=pusher") == [f"{name}1"]


def test_generated_names_are_unique_and_never_main():
    spec = ("full, a=pusher:3, b=pusher:2, synchrotron:4, client_reader:2, general_reader, "
            "x=event_persister+device_lists:3")
    got = names(spec)
    assert len(got) == len(set(got))
    assert "main" not in got and "master" not in got
