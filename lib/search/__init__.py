"""The search of rl_quantize.py as a library: its methods, episode loop, saved state and set-up.

    config   the flags that define a search (resume keys), read off the config dataclasses
    methods  --method: name -> action source and its options
    loop     the episode loop shared by every method, and its outputs
    state    search_state.pth.tar, the resume checks and the output folder
    build    data, model, cost model and env from the flags
"""
from .build import build_cost, build_env, build_loaders, build_model, settle_from_pretrained
from .config import SearchConfig, config_from_args, resume_defaults, resume_fields
from .loop import LOG_COLUMNS, Search, follow_search, play_episode, run_search
from .methods import (METHODS, Method, build_agent, check_method_args, load_agent_weights,
                      methods_help)
from .state import STATE_FILE, load_search_state, output_folder

__all__ = ["build_cost", "build_env", "build_loaders", "build_model", "settle_from_pretrained",
           "SearchConfig", "config_from_args", "resume_defaults", "resume_fields", "LOG_COLUMNS",
           "Search", "follow_search", "play_episode", "run_search", "METHODS", "Method",
           "build_agent", "check_method_args", "load_agent_weights", "methods_help", "STATE_FILE",
           "load_search_state", "output_folder"]
