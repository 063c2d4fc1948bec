"""``fleet history`` ends where the stream's leader ends, not where the server
serving its consumer does. The consumer is R1 on any replica; one that is
still catching up after a restart says "nothing pending" early. A fake
JetStream plays the leader and that replica, deterministically."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import nats.errors
import nats.js.errors
import pytest
from nats.js.api import DeliverPolicy

from cnisup.protocol import envelope, subjects
from cnisup.protocol.kinds import ConfigKind
from cnisup.protocol.settings import Config
from cnisup.supervisor import fleet

PREFIX = "cnisup"


@dataclass
class Message:
    seq: int
    subject: str
    data: bytes
    ts: int


def stream(nodes: list[str]) -> list[Message]:
    """One event per entry, the node named, seq 1.., ts = seq seconds."""
    stamps = {n: envelope.Stamp(source="inotify", node=n, incarnation=envelope.new_incarnation()) for n in nodes}
    out = []
    for seq, node in enumerate(nodes, 1):
        env = stamps[node].build(ConfigKind.CONFIG_MODIFIED, {"path": f"/etc/cni/net.d/{seq}.conflist",
                                                              "dir": "/etc/cni/net.d", "valid": True},
                                 ts=seq * 10**9)
        out.append(Message(seq, subjects.subject(PREFIX, node, env["kind"]), json.dumps(env).encode(), env["ts"]))
    return out


@dataclass
class Replica:
    """The server the consumer lands on: it holds ``held`` of the leader's messages and catches
    up by ``step`` after each fetch that found nothing (``step`` 0: never)."""

    leader: list[Message]
    held: int
    step: int = 0
    fetches: int = 0

    def catch_up(self) -> None:
        self.held = min(len(self.leader), self.held + self.step)


@dataclass
class FakeSub:
    replica: Replica
    subject: str
    next_seq: int  #: the next sequence the consumer looks at

    def _matching(self) -> list[Message]:
        return [m for m in self.replica.leader[:self.replica.held]
                if m.seq >= self.next_seq and subjects.matches(self.subject, m.subject)]

    async def consumer_info(self) -> Any:
        return SimpleNamespace(num_pending=len(self._matching()),
                               delivered=SimpleNamespace(stream_seq=self.next_seq - 1))

    async def fetch(self, batch: int, timeout: float) -> list[Any]:
        self.replica.fetches += 1
        todo = self._matching()[:batch]
        if not todo:
            self.replica.catch_up()
            await asyncio.sleep(0.001)
            raise nats.errors.TimeoutError
        self.next_seq = todo[-1].seq + 1
        left = len(self._matching())
        return [SimpleNamespace(subject=m.subject, data=m.data, metadata=SimpleNamespace(
            num_pending=left + len(todo) - i - 1, sequence=SimpleNamespace(stream=m.seq)))
            for i, m in enumerate(todo)]

    async def unsubscribe(self) -> None:
        pass


@dataclass
class FakeJetStream:
    replica: Replica
    stale_infos: int = 0  #: answers from a restarted member that has not heard from the leader yet
    gets: list[int] = field(default_factory=list)

    async def stream_info(self, name: str) -> Any:
        if self.stale_infos:
            self.stale_infos -= 1
            state = SimpleNamespace(last_seq=self.replica.held)
            return SimpleNamespace(cluster=SimpleNamespace(leader=None), state=state)
        return SimpleNamespace(cluster=SimpleNamespace(leader="n2"),
                               state=SimpleNamespace(last_seq=len(self.replica.leader)))

    async def pull_subscribe(self, subject: str, stream: str, config: Any) -> FakeSub:
        start = 1
        if config.deliver_policy == DeliverPolicy.BY_START_TIME:
            since = int(config.opt_start_time.timestamp() * 10**9)
            start = next((m.seq for m in self.replica.leader[:self.replica.held] if m.ts >= since),
                         self.replica.held + 1)
        return FakeSub(self.replica, subject, start)

    async def get_msg(self, name: str, seq: int, subject: str, next: bool) -> Any:
        """Only the leader answers: its whole store."""
        self.gets.append(seq)
        for m in self.replica.leader[seq - 1:]:
            if subjects.matches(subject, m.subject):
                return SimpleNamespace(seq=m.seq)
        raise nats.js.errors.NotFoundError(code=404, err_code=fleet.NO_MESSAGE, description="no message found")


def history(js: FakeJetStream, subject: str = f"{PREFIX}.*.>", since_ns: int | None = None) -> list[int]:
    r = fleet.Reader(dataclasses.replace(Config().export.nats, servers=["nats://x"], subject_prefix=PREFIX))
    r.js = js  # type: ignore[assignment]

    async def read() -> list[int]:
        return [env["ts"] // 10**9 async for env, _ in r.history(subject, since_ns)]
    return asyncio.run(read())


def test_a_read_served_by_a_replica_catching_up_waits_for_what_the_leader_holds(
        capsys: pytest.CaptureFixture[str]) -> None:
    replica = Replica(stream(["node-a"] * 50), held=3, step=20)
    assert history(FakeJetStream(replica)) == list(range(1, 51))
    assert "behind the leader of stream 'CNISUP'" in capsys.readouterr().err


def test_the_end_is_the_leaders_even_when_a_stale_member_answers_stream_info_first() -> None:
    replica = Replica(stream(["node-a"] * 50), held=3, step=20)
    assert history(FakeJetStream(replica, stale_infos=2)) == list(range(1, 51))


def test_a_replica_that_never_catches_up_fails_the_read_instead_of_a_history_with_a_hole(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet, "CATCH_UP_S", 0.1)
    replica = Replica(stream(["node-a"] * 50), held=3)
    with pytest.raises(fleet.StreamError, match=r"read up to sequence 3 of 50\) and delivered nothing more"):
        history(FakeJetStream(replica))


def test_a_current_replica_costs_one_question_to_the_leader_and_no_wait(capsys: pytest.CaptureFixture[str]) -> None:
    # node-a's last event is not the stream's last: the leader says nothing of node-a follows it.
    replica = Replica(stream(["node-a", "node-b"] * 20 + ["node-b"] * 5), held=45)
    js = FakeJetStream(replica)
    assert history(js, f"{PREFIX}.node-a.>") == list(range(1, 40, 2))
    assert js.gets == [40] and replica.fetches == 1 and capsys.readouterr().err == ""


def test_since_starts_where_the_consumer_starts_and_older_messages_do_not_count_as_missing() -> None:
    replica = Replica(stream(["node-a"] * 30), held=30)
    js = FakeJetStream(replica)
    assert history(js, since_ns=21 * 10**9) == list(range(21, 31))
    assert js.gets == []  # it delivered the last message: no question


def test_an_empty_stream_and_a_subject_nothing_matches_end_at_once() -> None:
    assert history(FakeJetStream(Replica([], held=0))) == []
    replica = Replica(stream(["node-b"] * 5), held=5)
    assert history(FakeJetStream(replica), f"{PREFIX}.node-a.>") == []
