"""Statistics, pure and by hand (docs/design.md §10, §11): what alert rules and experiment results compute.

Special functions (normal, Student t, χ², Poisson, beta) are written here rather than imported from scipy,
which stays a test oracle: tests/unit/test_stats.py compares every function with scipy / statsmodels /
GrowthBook's gbstats to 1e-9.

Experiments compare a variation B with the control A per metric from sufficient statistics (`Arm`: n, Σy,
Σy², and for a ratio metric Σx, Σx², Σxy). Definitions follow GrowthBook's engine where it has one:
- means: Welch's t (Satterthwaite degrees of freedom); proportions: a unit's variance p(1 − p);
- relative lift (B − A) / A with the delta method: Var ≈ Var_B / (A² n_B) + B² Var_A / (A⁴ n_A);
- ratio metrics Σy / Σx: the delta method over the units' (x, y);
- conversions, absolute: the two-proportion z-test (pooled for the p-value, unpooled for the interval);
- anytime-valid intervals: the asymptotic confidence sequence of Waudby-Smith et al. (2023, eq. 9) with
  GrowthBook's tuning (ρ from eq. 161, n* = 5,000), and its e-value p-value (eq. 155): valid however often
  the results are looked at;
- Bayesian, normal on the lift with a flat prior: chance to win Φ(μ/σ), expected losses; for conversions,
  exact beta-binomial: Beta(1 + k, 1 + n − k) posteriors, P(B > A) and E[max(A − B, 0)] by quadrature;
- sample ratio mismatch: Pearson's χ² of the units per variation against the configured split.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

NORMAL = statistics.NormalDist()


def z_of(confidence: float) -> float:
    """Two-sided normal quantile: 1.96 at 0.95."""
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(rate: float, n: float, confidence: float) -> tuple[float, float]:
    """The Wilson score interval of a proportion observed as `rate` over `n` trials."""
    if n <= 0:
        return 0.0, 1.0
    z = z_of(confidence)
    z2 = z * z
    centre = (rate + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(rate * (1 - rate) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _gamma_p(a: float, x: float) -> float:
    """The regularized lower incomplete gamma function P(a, x) (series, or Lentz's continued fraction)."""
    if x <= 0:
        return 0.0
    log_front = _log_front(a, x)
    if x < a + 1:
        term = total = 1.0 / a
        ap = a
        for _ in range(10_000):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-16:
                break
        return min(1.0, total * math.exp(log_front))
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-16:
            break
    return max(0.0, 1.0 - math.exp(log_front) * h)


def _log_front(a: float, x: float) -> float:
    """log(x^a e^-x / Γ(a)). For large a the direct sum cancels terms of size a·log x: written instead with
    Stirling's series, around x = a, where it is exact to ~1e-15 relative."""
    if a < 30:
        return a * math.log(x) - x - math.lgamma(a)
    d = (x - a) / a
    stirling = 1 / (12 * a) - 1 / (360 * a ** 3) + 1 / (1260 * a ** 5)  # lgamma(a) − its Stirling approximation
    return a * (math.log1p(d) - d) + 0.5 * math.log(a / (2 * math.pi)) - stirling


def poisson_cdf(k: int, mean: float) -> float:
    """P(X ≤ k) for X ~ Poisson(mean)."""
    if k < 0:
        return 0.0
    if mean <= 0:
        return 1.0
    return 1.0 - _gamma_p(k + 1, mean)


def poisson_bounds(mean: float, confidence: float) -> tuple[int, int]:
    """The central interval a Poisson(mean) count falls in with probability ≥ confidence, as
    scipy.stats.poisson.interval: the quantiles at α/2 and 1 − α/2 (smallest k with P(X ≤ k) ≥ q)."""
    if mean <= 0:
        return 0, 0

    def quantile(q: float) -> int:  # from the normal approximation, then exact steps
        k = max(0, int(mean + statistics.NormalDist().inv_cdf(q) * math.sqrt(mean)))
        while k > 0 and poisson_cdf(k - 1, mean) >= q:
            k -= 1
        while poisson_cdf(k, mean) < q:
            k += 1
        return k

    tail = (1 - confidence) / 2
    return quantile(tail), quantile(1 - tail)


# ---- Student t, χ², beta -------------------------------------------------------------------------------

def beta_inc(a: float, b: float, x: float, y: float | None = None) -> float:
    """The regularized incomplete beta function I_x(a, b) (Lentz's continued fraction); `y` = 1 − x when the
    caller has it exactly (t's tails: x = df / (df + t²) is 1 − t² / (df + t²), which rounding would lose)."""
    y = 1.0 - x if y is None else y
    if x <= 0:
        return 0.0
    if y <= 0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y))
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast on this side only
        return 1.0 - beta_inc(b, a, y, x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (tiny if abs(d) < tiny else d)
    h = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (tiny if abs(d) < tiny else d)
            c = 1 + numerator / c
            c = tiny if abs(c) < tiny else c
            h *= d * c
        if abs(d * c - 1) < 1e-16:
            break
    return front * h / a


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with `df` degrees of freedom."""
    if math.isinf(df):
        return NORMAL.cdf(t)
    tail = 0.5 * beta_inc(df / 2, 0.5, df / (df + t * t), t * t / (df + t * t))
    return 1 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The t quantile: Newton's method from the normal one, then bisection if it wanders."""
    if math.isinf(df) or df > 1e7:
        return NORMAL.inv_cdf(q)
    x = NORMAL.inv_cdf(q)
    for _ in range(100):
        f = t_cdf(x, df) - q
        density = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
                           - (df + 1) / 2 * math.log1p(x * x / df))
        step = f / density
        x -= step
        if abs(step) < 1e-13 * max(1.0, abs(x)):
            return x
    lo, hi = -1e6, 1e6
    for _ in range(400):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def chi2_sf(x: float, k: float) -> float:
    """P(X > x) for χ² with k degrees of freedom."""
    return 1.0 - _gamma_p(k / 2, x / 2) if x > 0 else 1.0


def beta_pdf(a: float, b: float, x: float) -> float:
    """The Beta(a, b) density, for a, b ≥ 1 (posteriors of uniform priors): finite at both ends."""
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    if x <= 0:
        return math.exp(log_norm) if a == 1 else 0.0
    if x >= 1:
        return math.exp(log_norm) if b == 1 else 0.0
    return math.exp(log_norm + (a - 1) * math.log(x) + (b - 1) * math.log1p(-x))


# ---- experiments: one metric, a variation against the control ----------------------------------------

@dataclass(frozen=True, slots=True)
class Arm:
    """A variation's sufficient statistics for one metric: units n, Σy, Σy²; for a ratio metric (Σy / Σx)
    also Σx, Σx², Σxy; for CUPED the covariate's Σp, Σp², Σpy and the adjustment θ (`cuped`: 0 = none).
    `kind`: "proportion" (y and p are 0/1), "mean" or "ratio"."""

    n: int
    sy: float
    syy: float
    kind: str = "mean"
    sx: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0
    sp: float = 0.0
    spp: float = 0.0
    spy: float = 0.0
    theta: float = 0.0

    @property
    def unadjusted_mean(self) -> float:
        if self.kind == "ratio":
            return self.sy / self.sx if self.sx else 0.0
        return self.sy / self.n if self.n else 0.0

    @property
    def mean(self) -> float:
        """CUPED-adjusted when θ is set: ȳ − θ·p̄ (GrowthBook's RegressionAdjustedStatistic)."""
        if self.theta:
            return self.unadjusted_mean - self.theta * self.sp / self.n
        return self.unadjusted_mean

    @property
    def variance(self) -> float:
        """Per unit (divide by n for the mean's); of y − θp with CUPED."""
        if not self.theta:
            return self._variance_y()
        if self.n <= 1:
            return 0.0
        pre = _moments_variance(self.kind, self.n, self.sp, self.spp)
        cov = (self.spy - self.sy * self.sp / self.n) / (self.n - 1)
        return self._variance_y() + self.theta ** 2 * pre - 2 * self.theta * cov

    def _variance_y(self) -> float:
        n = self.n
        if self.kind != "ratio":
            return _moments_variance(self.kind, n, self.sy, self.syy)
        if n <= 1:
            return 0.0
        var_y = (self.syy - self.sy * self.sy / n) / (n - 1)
        mx, my = self.sx / n, self.sy / n
        if mx == 0:
            return 0.0
        var_x = (self.sxx - self.sx * self.sx / n) / (n - 1)
        cov = (self.sxy - self.sx * self.sy / n) / (n - 1)
        return var_y / mx ** 2 - 2 * cov * my / mx ** 3 + my ** 2 * var_x / mx ** 4


def _moments_variance(kind: str, n: int, s: float, ss: float) -> float:
    """The per-unit variance of a value from its sum and sum of squares (a 0/1 value: p(1 − p))."""
    if kind == "proportion":
        p = s / n if n else 0.0
        return p * (1 - p)
    return (ss - s * s / n) / (n - 1) if n > 1 else 0.0


def cuped(a: Arm, b: Arm) -> tuple[Arm, Arm, float]:
    """Both arms adjusted by CUPED with the θ of the pooled data (GrowthBook's compute_theta):
    cov(y, p) / var(p) over both arms together; θ = 0 (no adjustment) when p or y does not vary."""
    n = a.n + b.n
    sy, syy, sp, spp, spy = a.sy + b.sy, a.syy + b.syy, a.sp + b.sp, a.spp + b.spp, a.spy + b.spy
    pre, post = _moments_variance(a.kind, n, sp, spp), _moments_variance(a.kind, n, sy, syy)
    if a.kind == "ratio" or n <= 1 or pre == 0 or post == 0:
        return a, b, 0.0
    theta = (spy - sy * sp / n) / (n - 1) / pre
    return replace(a, theta=theta), replace(b, theta=theta), theta


@dataclass(frozen=True, slots=True)
class Estimate:
    """A lift (absolute B − A, or relative (B − A) / A) with its standard error, a two-sided interval at
    1 − alpha and its p-value against no difference."""

    point: float
    se: float
    dof: float
    lower: float
    upper: float
    p_value: float


def _var_of_lift(a: Arm, b: Arm, relative: bool) -> float:
    if relative:  # the delta method; with CUPED, around the unadjusted means (as GrowthBook)
        ma, mb = a.unadjusted_mean, b.unadjusted_mean
        return b.variance / (ma ** 2 * b.n) + a.variance * mb ** 2 / (ma ** 4 * a.n)
    return b.variance / b.n + a.variance / a.n


def _lift(a: Arm, b: Arm, relative: bool) -> float:
    return (b.mean - a.mean) / a.unadjusted_mean if relative else b.mean - a.mean


def welch_dof(a: Arm, b: Arm) -> float:
    va, vb = a.variance / a.n, b.variance / b.n
    denominator = vb * vb / (b.n - 1) + va * va / (a.n - 1)
    return (va + vb) ** 2 / denominator if denominator > 0 else math.inf


def t_test(a: Arm, b: Arm, *, relative: bool, alpha: float = 0.05) -> Estimate:
    """Welch's t on the lift (GrowthBook's TwoSidedTTest; scipy's ttest_ind(equal_var=False) for an
    absolute difference of means)."""
    point = _lift(a, b, relative)
    se = math.sqrt(_var_of_lift(a, b, relative))
    dof = welch_dof(a, b)
    half = t_ppf(1 - alpha / 2, dof) * se
    p = 2 * (1 - t_cdf(abs(point / se), dof)) if se > 0 else 1.0
    return Estimate(point, se, dof, point - half, point + half, min(1.0, p))


def z_test(a: Arm, b: Arm, *, alpha: float = 0.05) -> Estimate:
    """Two proportions, absolute difference: the p-value of the pooled z (statsmodels' proportions_ztest),
    the interval from the unpooled standard error (Wald)."""
    point = b.mean - a.mean
    se = math.sqrt(a.mean * (1 - a.mean) / a.n + b.mean * (1 - b.mean) / b.n)
    pooled = (a.sy + b.sy) / (a.n + b.n)
    se0 = math.sqrt(pooled * (1 - pooled) * (1 / a.n + 1 / b.n))
    p = 2 * NORMAL.cdf(-abs(point) / se0) if se0 > 0 else 1.0
    half = NORMAL.inv_cdf(1 - alpha / 2) * se
    return Estimate(point, se, math.inf, point - half, point + half, p)


SEQUENTIAL_TUNING = 5000  # n* of the confidence sequence: tightest around this many units (GrowthBook's)


def sequential(a: Arm, b: Arm, *, relative: bool, alpha: float = 0.05,
               tuning: float = SEQUENTIAL_TUNING) -> Estimate:
    """The anytime-valid interval and p-value of the lift (GrowthBook's SequentialTwoSidedTTest): an
    asymptotic confidence sequence, valid at every look."""
    point = _lift(a, b, relative)
    variance = _var_of_lift(a, b, relative)
    n = a.n + b.n
    rho2 = (-2 * math.log(alpha) + math.log(-2 * math.log(alpha) + 1)) / tuning
    half = math.sqrt(variance * n) * math.sqrt(
        2 * (n * rho2 + 1) * math.log(math.sqrt(n * rho2 + 1) / alpha) / (n * n * rho2))
    st2 = point * point * n / variance if variance > 0 else 0.0
    log_e_value = rho2 * st2 / (2 * (n * rho2 + 1)) - 0.5 * math.log(n * rho2 + 1)
    return Estimate(point, math.sqrt(variance), math.inf, point - half, point + half,
                    min(1.0, math.exp(-log_e_value)))


def chance_to_win(point: float, se: float) -> float:
    """P(lift > 0) under N(point, se²): a flat prior's posterior (GrowthBook's EffectBayesianABTest)."""
    return NORMAL.cdf(point / se) if se > 0 else float(point > 0)


def expected_losses(point: float, se: float) -> tuple[float, float]:
    """(choosing the control, choosing the variation): E[max(lift, 0)] and E[max(−lift, 0)] under
    N(point, se²)."""
    if se <= 0:
        return max(point, 0.0), max(-point, 0.0)
    z = point / se
    density = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    return point * NORMAL.cdf(z) + se * density, -point * NORMAL.cdf(-z) + se * density


def beta_binomial(a: Arm, b: Arm, *, nodes: int = 8000) -> tuple[float, float, float]:
    """Conversions with uniform priors: Beta(1 + k, 1 + n − k) per variation. (P(B > A), E[max(A − B, 0)],
    E[max(B − A, 0)]) by Simpson's rule over ±40 standard deviations of the narrower posterior P (a posterior
    piled against 0 or 1 has an exponential tail: ±14 would miss 1e-6 of it), the other
    one Q entering through its CDF and partial mean, E[Q; Q > x] = μ_Q (1 − I_x(α_Q + 1, β_Q)), which are
    smooth there."""
    params = [(1 + arm.sy, 1 + arm.n - arm.sy) for arm in (a, b)]
    sds = [math.sqrt(al * be / ((al + be) ** 2 * (al + be + 1))) for al, be in params]
    swap = sds[1] > sds[0]  # integrate over A's posterior: the roles of the two flip
    (ap, bp), (aq, bq) = (params[0], params[1]) if swap else (params[1], params[0])
    mean_p, mean_q, sd_p = ap / (ap + bp), aq / (aq + bq), min(sds)
    lo, hi = max(0.0, mean_p - 40 * sd_p), min(1.0, mean_p + 40 * sd_p)
    step = (hi - lo) / nodes
    below = excess_q = excess_p = 0.0  # ∫ f_P P(Q < x), E[max(Q − P, 0)], E[max(P − Q, 0)]
    for i in range(nodes + 1):
        x = lo + i * step
        weight = (1 if i in (0, nodes) else 4 if i % 2 else 2) * beta_pdf(ap, bp, x)
        if weight == 0:
            continue
        q_below = beta_inc(aq, bq, x)
        q_above_mean = mean_q * (1 - beta_inc(aq + 1, bq, x))  # E[Q; Q > x]
        below += weight * q_below
        excess_q += weight * (q_above_mean - x * (1 - q_below))
        excess_p += weight * (x * q_below - (mean_q - q_above_mean))
    below, excess_q, excess_p = below * step / 3, excess_q * step / 3, excess_p * step / 3
    if swap:  # P = A, Q = B: P(B > A) = 1 − P(B < A)
        return 1 - below, excess_p, excess_q
    return below, excess_q, excess_p


def srm(units: Sequence[int], weights: Sequence[float]) -> float:
    """The p-value of Pearson's χ² test of the units per variation against the expected split."""
    total, weight = sum(units), sum(weights)
    if not total:
        return 1.0
    expected = [w / weight * total for w in weights]
    x = sum((o - e) ** 2 / e for o, e in zip(units, expected, strict=True) if e > 0)
    return chi2_sf(x, len(units) - 1)
