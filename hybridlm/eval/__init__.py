"""Evaluation: retrieval length generalization, state tracking, perplexity by position.

    hybridlm eval MODEL... --task niah-1,mqar --lengths 1x,2x,4x,8x

``tasks`` generates the data (also for training), ``scoring`` scores a batch, ``harness`` runs the
grid, ``report`` prints the table and writes JSON and the plot; ``lm_eval_model`` adapts a model
to EleutherAI's lm-evaluation-harness (optional dependency).
"""
from hybridlm.eval.harness import Cell, EvalModel, LengthArg, evaluate, load_eval_model, parse_lengths
from hybridlm.eval.report import format_table, plot_results, results_document, write_json

__all__ = ["Cell", "EvalModel", "LengthArg", "evaluate", "load_eval_model", "parse_lengths", "format_table",
           "plot_results", "results_document", "write_json"]
