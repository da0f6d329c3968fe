# Run by every Python kernel of warren-code-interpreter once its shell exists
# (IPKernelApp.exec_files), in the user namespace: everything lives inside one function that
# deletes itself, so a cell sees no trace of it. It adds E2B's rich result formats: `e2b/chart`
# for matplotlib figures (extracted by E2B's own `e2b_charts` package, so the SDK's chart classes
# get exactly what they parse upstream) and `e2b/data` for pandas DataFrames (columns as lists).
# Neither matplotlib nor pandas is imported until user code does.


def __warren_setup():
    import sys

    try:
        from IPython import get_ipython
        from IPython.core.formatters import BaseFormatter
        from traitlets import Unicode

        ip = get_ipython()
        if ip is None:
            return

        def figure_chart(fig):
            try:
                import warnings

                from e2b_charts import chart_figure_to_dict

                # Its pydantic models warn about numpy scalars (ticks of a box plot): noise in
                # the user's stderr for values that serialize fine.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return chart_figure_to_dict(fig) or None
            except Exception as e:
                print(f"warren: no chart data for this figure: {e!r}", file=sys.__stderr__)
                return None

        def dataframe_data(df):
            try:
                import pandas

                def plain(v):
                    if isinstance(v, pandas.Timestamp):
                        return v.isoformat()
                    # JSON has no NaN: missing values are null, not the string "nan".
                    if v is pandas.NaT or (isinstance(v, float) and v != v):
                        return None
                    return v

                data = df.to_dict(orient="list")
                for key, values in data.items():
                    data[key] = [plain(v) for v in values]
                # Column labels that are not strings (ints, tuples) become JSON object keys.
                return {str(k): v for k, v in data.items()}
            except Exception as e:
                print(f"warren: no data for this DataFrame: {e!r}", file=sys.__stderr__)
                return None

        def is_a(obj, names):
            return any((c.__module__, c.__name__) in names for c in type(obj).__mro__)

        # By class name, not isinstance: matplotlib and pandas stay unimported until a cell
        # imports them. (BaseFormatter.for_type_by_name would do that too, but its registry is
        # a config trait that the kernel's start-up resets after exec_files.)
        figure = {("matplotlib.figure", "Figure")}
        dataframe = {("pandas", "DataFrame"), ("pandas.core.frame", "DataFrame")}

        class E2BChartFormatter(BaseFormatter):
            format_type = Unicode("e2b/chart")
            _return_type = (dict, list)

            def __call__(self, obj):
                return figure_chart(obj) if self.enabled and is_a(obj, figure) else None

        class E2BDataFormatter(BaseFormatter):
            format_type = Unicode("e2b/data")
            _return_type = (dict, list)

            def __call__(self, obj):
                return dataframe_data(obj) if self.enabled and is_a(obj, dataframe) else None

        formatters = ip.display_formatter.formatters
        formatters["e2b/chart"] = E2BChartFormatter(parent=ip.display_formatter)
        formatters["e2b/data"] = E2BDataFormatter(parent=ip.display_formatter)
    except Exception as e:
        print(f"warren: e2b formatters not installed: {e!r}", file=sys.__stderr__)


__warren_setup()
del __warren_setup
