"""The daemon's metrics: what GET /metrics returns (Prometheus text), gathered from the daemon's state.

``render(daemon)`` reads the restore-latency histogram and counters, the pool's worker counts, each image's
page-server fault totals and shared memfd size, and the clones' memory (smaps_rollup); snapd.daemon.metrics
formats it. ``Daemon.metrics_text`` calls it.
"""
from __future__ import annotations

from snapd.daemon import metrics


def render(daemon) -> str:
    """The text of GET /metrics for ``daemon`` (its ``metrics_text``)."""
    with daemon.lock:
        clones = [c for c in daemon.clones.values() if c is not None]
        runtimes = list(daemon.images.values())
    by_state = {"running": 0, "failed": 0}
    private = pss = 0
    for clone in clones:
        by_state[clone.state] = by_state.get(clone.state, 0) + 1
        rollup = metrics.smaps_rollup(clone.worker.pid)
        private += rollup.get("Private_Dirty", 0)
        pss += rollup.get("Pss", 0)
    lines = daemon.latency.render("snapd_restore_latency_seconds",
                                  "Restore latency: request received to the clone running (and its first reply "
                                  "when the request carried a payload)")
    lines += metrics.family("snapd_clones", "gauge", "Live clones by state",
                            [({"state": s}, n) for s, n in sorted(by_state.items())])
    lines += metrics.family("snapd_restores_total", "counter", "Clones restored",
                            [({}, daemon.counters["restores"])])
    lines += metrics.family("snapd_lane_restores_total", "counter",
                            "Clones restored by the lane (request read, restored and answered in C)",
                            [({}, daemon.counters["lane_restores"])])
    lines += metrics.family("snapd_lane_invocations_total", "counter",
                            "Invocations of live clones the lane answered (request read, sent and answered in C)",
                            [({}, daemon.lane.invocations())])
    lines += metrics.family("snapd_restore_failures_total", "counter", "Restore requests that failed",
                            [({}, daemon.counters["restore_failures"])])
    lines += metrics.family("snapd_pool_idle_workers", "gauge", "Warm workers ready for a restore",
                            [({}, daemon.pool.idle_count())])
    lines += metrics.family("snapd_pool_prepared_workers", "gauge",
                            "Workers restored ahead for an image, waiting for a request",
                            [({}, daemon.pool.prepared_count())])
    lines += metrics.family("snapd_stale_vmms_stopped", "gauge",
                            "VMM processes of a previous daemon stopped at start-up", [({}, len(daemon.stale_stopped))])
    faults, shared = [], []
    for runtime in runtimes:
        totals = {"faults": 0, "shared_fills": 0, "shared_wakes": 0, "errors": 0}
        for shard in runtime.shards:
            for key, value in shard.faults().items():
                totals[key] += value
        faults += [({"image": runtime.record.id, "kind": k}, v) for k, v in totals.items()]
        shared.append(({"image": runtime.record.id}, sum(s.memfd_bytes() for s in runtime.shards)))
    lines += metrics.family("snapd_page_faults", "gauge", "userfaultfd faults served (faults), chunks filled "
                            "into the shared memfd, wakes and errors, over the page server's live VM slots", faults)
    lines += metrics.family("snapd_shared_bytes", "gauge", "Bytes of image memory in the shared memfds", shared)
    lines += metrics.family("snapd_clone_private_bytes", "gauge",
                            "Private dirty bytes of all clone VMM processes (guest writes + VMM heap)",
                            [({}, private)])
    lines += metrics.family("snapd_clone_pss_bytes", "gauge", "Proportional set size of all clone VMM processes",
                            [({}, pss)])
    return "\n".join(lines) + "\n"
