"""The look every tuneguard chart shares (report figures and the per-run VN figure)."""

from __future__ import annotations


def style_axes(ax, xlabel: str, ylabel: str, *, legend_fontsize: float = 7, legend_loc: str = "best") -> None:
    """Small labels and ticks, a light grid on major and minor ticks, the legend."""
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(which="both", labelsize=7)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=legend_fontsize, loc=legend_loc)
