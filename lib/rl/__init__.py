"""Reinforcement learning for the search: the DDPG agent and its replay memory.

Numpy states in, numpy actions out; nothing here knows about models or data.
"""
from .ddpg import DDPG, DDPGConfig, truncated_normal
from .memory import ReplayMemory

__all__ = ["DDPG", "DDPGConfig", "ReplayMemory", "truncated_normal"]
