"""Running averages and top-k accuracy."""
import torch


class AverageMeter:
    """Keeps the latest value and the running (weighted) average."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.val = self.avg = self.sum = 0.0
        self.count = 0

    def update(self, val, n=1):
        self.val = float(val)
        self.sum += float(val) * n
        self.count += n
        self.avg = self.sum / max(self.count, 1)

    def add(self, total, n):
        """Add a batch's ``total`` over ``n`` items (exact when totals are whole numbers)."""
        self.sum += float(total)
        self.count += int(n)
        self.avg = self.sum / max(self.count, 1)


@torch.no_grad()
def accuracy(output, target, topk=(1,)):
    """Top-k accuracies in percent; k larger than the class count counts as all correct."""
    return [100.0 * c / target.size(0) for c in correct_counts(output, target, topk)]


@torch.no_grad()
def correct_counts(output, target, topk=(1,)):
    """How many samples have their target among the top k predictions, per k (ints).

    Counts, unlike percentages, add up exactly over batches and over ranks.
    """
    maxk = min(max(topk), output.size(1))
    _, pred = output.topk(maxk, 1, True, True)
    correct = pred.t().eq(target.view(1, -1))
    return [int(correct[:min(k, maxk)].sum().item()) for k in topk]
