"""The systemd unit's settings, read from the file (no systemd needed):
what the issue asks for, and every capability justified in a comment.
`systemd-analyze verify` of the installed unit is in test_deb.py."""

from __future__ import annotations

import re

from unitfile import UNIT_SRC, unit_settings

#: The capability bounding set: what the eBPF worker and the privilege drop need, no more.
UNIT_CAPS = {"CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_CHOWN", "CAP_KILL", "CAP_BPF", "CAP_PERFMON",
             "CAP_SYS_ADMIN", "CAP_SYS_RESOURCE", "CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE"}


def test_service_settings() -> None:
    one = {k: v[-1] for k, v in unit_settings().items()}
    expected = {
        "Type": "notify", "NotifyAccess": "main", "ExecStart": "/usr/bin/cnisup start --config /etc/cnisup/config.yaml",
        "ExecReload": "/bin/kill -HUP $MAINPID", "RuntimeDirectory": "cnisup", "RuntimeDirectoryMode": "0750",
        "Group": "cnisup", "Restart": "on-failure", "RestartPreventExitStatus": "78", "KillMode": "mixed",
        "NoNewPrivileges": "yes", "ProtectHome": "yes", "PrivateTmp": "yes", "LimitMEMLOCK": "infinity",
    }
    for key, value in expected.items():
        assert one.get(f"[Service]{key}") == value, key
    assert one["[Service]ProtectSystem"] in ("strict", "full")
    assert "[Service]User" not in one, "the supervisor runs as root; its workers drop privileges themselves"
    assert one["[Install]WantedBy"] == "multi-user.target"


#: Settings that would break the kernel family, each with the reason the unit must give.
NOT_SET = {
    "MemoryDenyWriteExecute": "BCC",  # LLVM's JIT needs W+X memory
    "ProtectKernelModules": "/usr/lib/modules",  # where BCC finds the kernel headers
    "ProtectKernelTunables": "kprobe",  # read-only /sys: no kprobes through tracefs
    "RestrictNamespaces": "namespaces",  # no setns into network namespaces
}


def test_settings_that_break_the_ebpf_worker_are_not_set_and_say_why() -> None:
    settings, text = unit_settings(), UNIT_SRC.read_text()
    for key, reason in NOT_SET.items():
        assert f"[Service]{key}" not in settings, key
        assert re.search(rf"^#\s+{key}\b.*{reason}", text, re.M), f"say why {key} is not set"


def test_capability_bounding_set_is_minimal_and_justified() -> None:
    caps = {c for v in unit_settings()["[Service]CapabilityBoundingSet"] for c in v.split()}
    assert caps == UNIT_CAPS
    text = UNIT_SRC.read_text()
    for cap in UNIT_CAPS:
        assert re.search(rf"^#.*\b{cap}\b", text, re.M), f"{cap} is not justified in a comment"
