"""The budget of a search: what a policy costs and the wall that keeps it within budget.

Paper section 3.3 ("limit action space"): after an episode's last action the bits are
lowered, one step at a time from the last step back, until the policy's cost is within
``preserve_ratio`` of the reference cost. A mode says how a policy is built from the
per-step bits and what it costs; :class:`PolicyBudget` does the rest.
"""
import math

from lib.utils.errors import UserError

COST_TOL = 1e-12   # relative: a lowered width whose cost is not below this saves nothing


class PolicyBudget:
    """Budget, cheapest policy and budget wall over the mode's ``policy_from_bits``/``cost``.

    Needs ``cfg`` (preserve_ratio), ``n_steps``, ``pins`` (step -> fixed bits) and
    ``step_widths(step)`` (the sorted widths a free step may take) on the object; a mode
    implements the first three methods.
    """

    def policy_from_bits(self, flat_bits):
        """Turn one bit width per step into the mode's policy (list of ints, or of [w, a])."""
        raise NotImplementedError

    def cost(self, policy):
        raise NotImplementedError

    def reference_cost(self):
        raise NotImplementedError

    def budget(self):
        return self.cfg.preserve_ratio * self.reference_cost()

    def min_bits(self):
        """The cheapest reachable step bits: every free step at its narrowest width, pins kept."""
        return [self.pins.get(i, self.step_widths(i)[0]) for i in range(self.n_steps)]

    def min_cost_ratio(self):
        return self.cost(self.policy_from_bits(self.min_bits())) / self.reference_cost()

    def check_budget(self):
        """Refuse a budget no policy can meet (UserError naming the smallest reachable ratio)."""
        smallest = self.min_cost_ratio()
        if self.cfg.preserve_ratio < smallest - 1e-12:
            raise UserError(
                f"--preserve_ratio {self.cfg.preserve_ratio} is unreachable: with every layer at "
                f"its narrowest width (--min_bit {self.cfg.min_bit}) the cost ratio is "
                f"{smallest:.4f}; expected a preserve ratio >= "
                f"{math.ceil(smallest * 1e4) / 1e4:.4f}")

    def free_steps(self):
        """The steps whose width the cost does not depend on (activations under a size budget).

        A step counts as free when moving it alone from its widest to its narrowest width,
        every other step at its widest, leaves the cost unchanged (within ``COST_TOL``).
        """
        top = [self.pins.get(i, self.step_widths(i)[-1]) for i in range(self.n_steps)]
        base = self.cost(self.policy_from_bits(top))
        floor = base - COST_TOL * max(1.0, abs(base))
        free = set()
        for i in range(self.n_steps):
            if i in self.pins:
                continue
            trial = list(top)
            trial[i] = self.step_widths(i)[0]
            if not self.cost(self.policy_from_bits(trial)) < floor:
                free.add(i)
        return free

    def action_wall(self, flat_bits):
        """Lower bits one step at a time, last step first, until within budget (paper 3.3).

        Sweeps from the last step backwards (linear mode: a layer's activation bits before
        its weight bits), moving each step to its next narrower allowed width, and repeats
        until ``cost <= preserve_ratio * reference`` or nothing can go lower -- the released
        wall, except that pinned steps and :meth:`free_steps` are left as chosen: lowering a
        width the cost ignores would lose accuracy and save nothing.
        """
        bits = list(flat_bits)
        target = self.budget()
        skip = set(self.pins) | self.free_steps()
        while self.cost(self.policy_from_bits(bits)) > target:
            lowered = False
            for i in reversed(range(self.n_steps)):
                narrower = [w for w in self.step_widths(i) if w < bits[i]]
                if i in skip or not narrower:
                    continue
                bits[i] = narrower[-1]
                lowered = True
                if self.cost(self.policy_from_bits(bits)) <= target:
                    return bits
            if not lowered:
                break
        return bits
