"""metrics.png: one colour per quantity across its panels, so a reader never mistakes the quantizer
alone for the rectified output when moving from the training to the validation panel."""

from matplotlib.colors import to_hex

from revq_pipe.pipeline.reporting.metrics_plot import draw_metrics

HISTORY = [{"epoch": e, "codebook_loss": 0.5 / e, "rectifier_loss": 0.4 / e, "val_mse": 0.45 / e,
            "val_mse_quantizer": 0.55 / e, "usage_mean_pct": 90.0, "usage_min_pct": 80.0,
            "val_usage_mean_pct": 85.0, "perplexity": 100.0, "val_perplexity": 95.0} for e in (1, 2, 3)]


def line_colours(figure):
    """{panel title: {legend label: colour}}, read off the drawn figure."""
    return {axes.get_title(): {line.get_label(): to_hex(line.get_color()) for line in axes.get_lines()}
            for axes in figure.axes}


def test_the_quantizer_and_the_rectified_output_keep_their_colours_from_panel_to_panel():
    colours = line_colours(draw_metrics(HISTORY))
    training, validation = colours["training losses"], colours["validation latent MSE"]
    assert training["codebook (quantizer alone)"] == validation["quantizer alone"]
    assert training["rectifier"] == validation["with rectifier"]
    assert training["rectifier"] != training["codebook (quantizer alone)"]
    usage, perplexity = colours["code usage"], colours["perplexity"]
    assert usage["training, mean over positions"] == perplexity["training"]
    assert usage["validation, mean"] == perplexity["validation"]
    assert perplexity["training"] != perplexity["validation"]


def test_a_run_without_validation_says_so_in_its_validation_panel():
    figure = draw_metrics([{k: v for k, v in row.items() if not k.startswith("val_")} for row in HISTORY])
    validation = next(axes for axes in figure.axes if axes.get_title() == "validation latent MSE")
    assert not validation.get_lines()
    assert [text.get_text() for text in validation.texts] == ["not measured (fit without --val)"]


def ceiling_lines(figure):
    """{panel title: (height, legend label)} of the validation ceiling lines drawn."""
    return {axes.get_title(): (line.get_ydata()[0], line.get_label()) for axes in figure.axes
            for line in axes.get_lines() if line.get_label().startswith("validation's ceiling")}


def test_few_validation_latents_show_the_ceiling_they_put_on_usage_and_perplexity():
    # 64 validation latents choose at most 64 of 128 codes per position: at most 50% usage, perplexity 64
    figure = draw_metrics(HISTORY, val_count=64, codes=128)
    assert ceiling_lines(figure) == {"code usage": (50.0, "validation's ceiling (64 latents)"),
                                     "perplexity": (64, "validation's ceiling (64 latents)")}
    assert figure.get_supxlabel() == ("64 validation latents can use at most 64 of the 128 codes of a position: "
                                      "validation's usage and perplexity stay under the dotted line, however good "
                                      "the codebooks")
    # as many validation latents as codes, or no validation: no ceiling to explain
    for figure in (draw_metrics(HISTORY, val_count=128, codes=128),
                   draw_metrics([{k: v for k, v in row.items() if not k.startswith("val_")} for row in HISTORY],
                                val_count=None, codes=128)):
        assert ceiling_lines(figure) == {} and figure.get_supxlabel() == ""
