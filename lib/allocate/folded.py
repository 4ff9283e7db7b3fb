"""A BatchNorm-folded, channels-last copy of a model's stages that carries a quantization policy.

The refinement (lib.allocate.refine) measures the loss of hundreds of whole-model policies.
On this copy each layer runs as its folded twin: BN(conv(Q_a(x), Q(W))) becomes
conv(Q_a(x), Q(W) * g/sigma) + b', the same maths up to float rounding with fewer operations
a pass (lib.allocate.staged folds the float stages the same way for the sensitivity scan).

What a layer carries into its twin (its quantized weight times the BatchNorm factor, its input
width and range, its bias where the quantizer moves it) is taken from the env's own
quantization of a policy and kept per (step, width): the env calibrates its ranges on the
float model, so a layer's weight state depends on its weight width only and its input's on
the input width, and a policy whose every step state is known needs no call of the env. :meth:`harvest_every_width` keeps them all up front
(one quantization per width; memory: a copy of the model's weights per width).
"""
import torch

from .staged import fold_twins, folded_weight


class FoldedPolicy:
    """The folded stages (``stages``) and their twins for ``modules`` (the env's layers, in
    order), holding the policy last passed to :meth:`carry`."""

    def __init__(self, env, stages, modules):
        env.restore_weights()   # the biases a twin's folded bias starts from
        env.model.eval()
        self.k, self.modules = env.actions_per_layer, list(modules)
        self.stages, self.twins = fold_twins(stages, self.modules)
        self.biases = [_bias_pair(m, twin) for m, (twin, _) in zip(self.modules, self.twins)]
        for twin, _ in self.twins:   # float twins: they take the quantized weights as given
            if hasattr(twin, "set_bits"):
                twin.set_bits(-1, -1)
        self.states, self.carried = {}, None

    def knows(self, key):
        """Whether every step's state under the flat bits ``key`` is kept."""
        return all((step, width) in self.states for step, width in enumerate(key))

    @torch.no_grad()
    def harvest(self, key):
        """Keep each step's state while the env's model holds its quantization of ``key``: a
        weight step's folded weight and moved bias, an activation step's width and range."""
        for i, (module, (twin, scale), (bias, twin_bias)) in enumerate(zip(
                self.modules, self.twins, self.biases)):
            w_step = i * self.k
            if (w_step, key[w_step]) not in self.states:
                moved = None
                if bias is not None:
                    shift = module.bias - bias
                    moved = twin_bias + (shift if scale is None else shift * scale)
                self.states[(w_step, key[w_step])] = (
                    folded_weight(module, scale).detach().clone(), moved)
            a_step = w_step + 1
            if self.k == 2 and (a_step, key[a_step]) not in self.states:
                a_bit = getattr(module, "a_bit", -1)
                self.states[(a_step, key[a_step])] = (
                    a_bit, module.activation_range.detach().clone() if a_bit > 0 else None)

    def harvest_every_width(self, env):
        """Keep every step's state at every width: the env quantizes one policy per width, each
        step at its kind's j-th width (its widest where it has fewer), pins kept."""
        steps = range(env.n_steps)
        for j in range(max((len(env.step_widths(i)) for i in steps), default=0)):
            key = tuple(env.pins[i] if i in env.pins else env.step_widths(i)[
                min(j, len(env.step_widths(i)) - 1)] for i in steps)
            env.quantize_policy(env.policy_from_bits(list(key)))
            self.harvest(key)

    @torch.no_grad()
    def carry(self, key):
        """Put the kept states of ``key`` into the twins (only steps whose width changed)."""
        for step, width in enumerate(key):
            if self.carried is not None and width == self.carried[step]:
                continue
            twin = self.twins[step // self.k][0]
            if step % self.k == 0:
                weight, bias = self.states[(step, width)]
                twin.weight.copy_(weight)
                if bias is not None:
                    twin.bias.copy_(bias)
                continue
            a_bit, act = self.states[(step, width)]
            twin.set_bits(a_bit=a_bit)
            if act is not None:
                twin.activation_range.copy_(act)
        self.carried = key


def _bias_pair(module, twin):
    """(module's bias, its twin's folded bias), copies; (None, None) for a layer without one."""
    if module.bias is None:
        return None, None
    return module.bias.detach().clone(), twin.bias.detach().clone()
