"""How long and how hard each scenario runs: one frozen Settings per kind of run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    """Sizes and durations of one run. `full()` for `make reliability`, `quick()` for QUICK=1, `ci()` for pytest."""

    name: str = "full"
    strict_timing: bool = True
    swap_clients: int = 16
    swap_before_s: float = 5.0
    swap_after_s: float = 5.0
    swap_drain_s: float = 2.0
    crash_clients: int = 8
    crash_baseline_s: float = 4.0
    crash_deadline_s: float = 60.0
    crash_after_s: float = 4.0
    overload_clients: int = 128
    overload_s: float = 15.0
    overload_requests_per_client: int = 40
    soak_s: float = 300.0
    soak_warmup_s: float = 30.0
    soak_clients: int = 4
    soak_rate_per_client: float = 10.0
    big_body_mb: int = 50
    known_issue_body_mb: int = 50
    skip_known: tuple[str, ...] = ()
    throughput_recovered: float = 0.8  # share of the pre-kill throughput that counts as "back"
    recovery_limit_s: float = 10.0
    fast_503_p99_ms: float = 500.0
    overload_rss_growth_mb: float = 512.0
    soak_growth_limit: float = 0.05

    @classmethod
    def full(cls) -> Settings:
        return cls()

    @classmethod
    def quick(cls) -> Settings:
        return cls(name="quick", soak_s=60.0, soak_warmup_s=15.0, overload_s=8.0, overload_requests_per_client=20)

    @classmethod
    def ci(cls) -> Settings:
        return cls(name="ci", strict_timing=False, swap_before_s=1.5, swap_after_s=1.5, swap_drain_s=1.0,
                   crash_baseline_s=2.0, crash_deadline_s=120.0, crash_after_s=1.5, overload_clients=120,
                   overload_s=6.0, overload_requests_per_client=10, soak_s=22.0, soak_warmup_s=6.0,
                   known_issue_body_mb=16, skip_known=())
