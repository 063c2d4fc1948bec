"""Kernel monitor family: CNI plugin runs and what they did to the network.

``ebpf`` (primary, BCC tracepoint programs) and ``proc-poll`` (fallback,
``/proc`` scans) share ``events``, so both emit the same kinds with the same
fields; ``features`` says what the host offers, for the worker and for
``cnisup check`` alike.
"""
