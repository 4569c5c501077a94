"""Every Redis key and stream name the worker touches, derived from the settings."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Keys:
    # Named by the settings:
    input: str = "sensors"  # producers XADD here; the worker never trims it
    output: str = "forecasts"  # one entry per forecast
    dead: str = "sensors:dead"  # bad input, with a reason
    anomalies: str = "anomalies"  # values far outside their forecast's interval
    group: str = "forecasters"  # the consumer group on `input`
    models: str = "models"  # model events; stored versions are keyed under this name
    cluster: bool = False  # on a Redis Cluster: see clustered()
    # Derived from those:
    state: str = field(init=False)  # window state checkpoint and the last input id it reflects
    lease: str = field(init=False)  # held by the one worker that consumes `input` for `group`
    fence: str = field(init=False)  # the lease's fence number: grows on every takeover
    handling: str = field(init=False)  # what the lease holder handles next, and its attempts
    pool: str = field(init=False)  # the workers that share the partitions of `input`
    partitions: str = field(init=False)  # how many partitions `input` is written in (P > 1)
    versions: str = field(init=False)  # the stored model versions, newest first (a list)
    serving: str = field(init=False)  # the version every worker should serve
    finetune_lock: str = field(init=False)  # held by the one worker fine-tuning now
    finetune_fence: str = field(init=False)  # the fine-tune lock's fence number

    def __post_init__(self) -> None:
        derived = {
            "state": f"{self.input}:windows:{self.group}",
            "lease": f"{self.input}:lease:{self.group}",
            "fence": f"{self.input}:fence:{self.group}",
            "handling": f"{self.input}:handling:{self.group}",
            "pool": f"{self.input}:pool:{self.group}",
            "partitions": f"{self.input}:partitions",
            "versions": f"{self.models}:versions",
            "serving": f"{self.models}:serving",
            "finetune_lock": f"{self.models}:finetune-lock",
            "finetune_fence": f"{self.models}:finetune-fence",
        }
        for name, key in derived.items():
            object.__setattr__(self, name, key)  # frozen: set once, here

    def model(self, version: str) -> str:
        """One stored model version's checkpoint bytes."""
        return f"{self.models}:v:{version}"

    def model_signature(self, version: str) -> str:
        """Its HMAC-SHA256 signature, hex (under the same ``models:v:*`` pattern, which
        the worker's ACL user may read and write)."""
        return f"{self.models}:v:{version}:sig"

    def partition(self, k: int, partitions: int) -> Keys:
        """The keys of partition ``k`` of ``partitions``: each stream's name with the hash
        tag ``{k}`` after it (``sensors{3}``, ``forecasts{3}``, ``sensors:dead{3}``, and
        from those ``sensors{3}:windows:forecasters``, ...), so that a partition's keys
        share one Redis Cluster slot and one function call can write them all. The
        models keys are shared by every partition. One partition on one server: these
        keys, as named; on a cluster it is tagged ``{0}`` like any other."""
        if partitions == 1 and k == 0 and not self.cluster:
            return self
        if not 0 <= k < partitions:
            raise ValueError(f"partition {k} is not one of 0 .. {partitions - 1}")
        for name in (self.input, self.output, self.dead, self.anomalies):
            if "{" in name or "}" in name:
                raise ValueError(
                    f"stream name {name!r} has a brace: with partitions, the worker adds the "
                    "hash tag {k} itself"
                )
        tag = f"{{{k}}}"
        return Keys(
            input=self.input + tag,
            output=self.output + tag,
            dead=self.dead + tag,
            anomalies=self.anomalies + tag,
            group=self.group,
            models=self.models,
            cluster=self.cluster,
        )

    def clustered(self) -> Keys:
        """These keys on a Redis Cluster, where the keys of one transaction or one
        function call must share a slot: the models keys under the hash tag of their
        name (``{models}``, ``{models}:versions``, ``{models}:v:<version>``, ...), and
        every partition tagged, even the one of a single partition (``sensors{0}``)."""
        if self.cluster:
            return self
        tagged = "{" in self.models  # named with its tag already (these keys' settings')
        return Keys(
            input=self.input,
            output=self.output,
            dead=self.dead,
            anomalies=self.anomalies,
            group=self.group,
            models=self.models if tagged else f"{{{self.models}}}",
            cluster=True,
        )

    @classmethod
    def prefixed(cls, prefix: str) -> Keys:
        """The default names with ``prefix`` in front of each stream's: the demo's
        (``demo:``), the bench's and the tests', beside a live system on one server."""
        default = cls()
        return cls(
            input=prefix + default.input,
            output=prefix + default.output,
            dead=prefix + default.dead,
            anomalies=prefix + default.anomalies,
            models=prefix + default.models,
        )
