//! A bound on the values one function call may build in a served query.
//!
//! A query's memory pool ([`crate::sql::Limits`]) sees the rows its scans copy out and what its
//! joins, sorts and aggregations hold, but not the arrays an expression builds: `repeat('x',
//! 1500000000)` took 7 GB in one call, and a handful of such statements at once would have
//! taken the engine down. So before a served query is planned for execution, every function
//! call in it is wrapped ([`bound_values`]): the call is refused when what it is about to build
//! can be seen to be larger than the bound (a count argument times its text, as `repeat`,
//! `lpad`, `rpad`, `replace` and `regexp_replace` take, or `concat_ws`'s separator once per
//! argument; the sum of its inputs, a constant once per row, for any other call that returns
//! text or bytes), already while it is planned when its arguments are constants, and its
//! result is measured once built. String concatenation with `||` is measured the same way. A
//! value past the bound is reported as a query limit.
//!
//! Each call's inputs are within the bound (they were measured as they were built, or are
//! rows a scan took within the pool), so one call builds at most a few times the bound before
//! it is stopped, whatever the statement nests. And all the calls of one statement together
//! may build at most a budget (counted as they build, never given back: constants the
//! optimizer folds stay in the plan for the whole query), so that many calls each within the
//! bound cannot add up past it either.

use std::any::Any;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, FieldRef};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DataFusionError, Result, ScalarValue};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::interval_arithmetic::Interval;
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::sort_properties::{ExprProperties, SortProperties};
use datafusion::logical_expr::{
    BinaryExpr, ColumnarValue, Documentation, Expr, ExpressionPlacement, LogicalPlan, Operator,
    ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

/// The words every refusal starts with; [`crate::sql`] reports an error holding them as a
/// query limit.
pub const PAST_BOUND: &str = "the values the query builds are too large";

/// What the function calls of one statement may build: each value at most `value` bytes, all
/// of them together at most `total`.
#[derive(Clone, Debug)]
pub struct Budget {
    value: usize,
    total: usize,
    built: Arc<AtomicUsize>,
}

impl Budget {
    /// A fresh budget for one statement.
    pub fn new(value: usize, total: usize) -> Self {
        Budget {
            value,
            total,
            built: Arc::default(),
        }
    }

    /// Counts `bytes` just built by `what`; an error once the statement's calls have built
    /// more than the total.
    fn spend(&self, what: &str, bytes: usize) -> Result<()> {
        let built = self.built.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if built > self.total {
            return Err(DataFusionError::ResourcesExhausted(format!(
                "{PAST_BOUND}: its functions build more than {} in all (the query's memory \
                 limit), {what} included; build fewer or smaller values",
                crate::sql::size(self.total),
            )));
        }
        Ok(())
    }
}

impl PartialEq for Budget {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.built, &other.built)
    }
}

impl Eq for Budget {}

impl Hash for Budget {
    fn hash<H: Hasher>(&self, state: &mut H) {
        Arc::as_ptr(&self.built).hash(state);
    }
}

/// Wraps every function call and every `||` in `plan` so that the values each builds, and
/// all of them together, stay within `budget`.
pub fn bound_values(plan: LogicalPlan, budget: &Budget) -> Result<LogicalPlan> {
    plan.transform_up_with_subqueries(|node| node.map_expressions(|expr| bound_expr(expr, budget)))
        .map(|done| done.data)
}

fn bound_expr(expr: Expr, budget: &Budget) -> Result<Transformed<Expr>> {
    expr.transform_up(|expr| Ok(wrap(expr, budget)))
}

fn wrap(expr: Expr, budget: &Budget) -> Transformed<Expr> {
    match expr {
        // A `||` measured twice (wrapped again by a later pass over a plan, or by a wrapped
        // call's simplification) would count twice against the budget: measured once.
        Expr::ScalarFunction(call)
            if is_measured(&call.func)
                && matches!(call.args.as_slice(), [Expr::ScalarFunction(inner)] if is_measured(&inner.func)) =>
        {
            Transformed::yes(call.args.into_iter().next().expect("one argument"))
        }
        Expr::ScalarFunction(call) if !is_bounded(&call.func) => {
            let func = Arc::new(ScalarUDF::new_from_impl(Bounded {
                inner: call.func,
                budget: budget.clone(),
            }));
            Transformed::yes(Expr::ScalarFunction(ScalarFunction::new_udf(
                func, call.args,
            )))
        }
        Expr::BinaryExpr(BinaryExpr {
            op: Operator::StringConcat,
            ..
        }) => {
            let measure = Arc::new(ScalarUDF::new_from_impl(Measured::new(budget.clone())));
            Transformed::yes(Expr::ScalarFunction(ScalarFunction::new_udf(
                measure,
                vec![expr],
            )))
        }
        other => Transformed::no(other),
    }
}

fn is_bounded(func: &ScalarUDF) -> bool {
    let inner: &dyn Any = func.inner().as_ref();
    inner.is::<Bounded>() || is_measured(func)
}

fn is_measured(func: &ScalarUDF) -> bool {
    let inner: &dyn Any = func.inner().as_ref();
    inner.is::<Measured>()
}

fn past(what: &str, bytes: usize, bound: usize) -> DataFusionError {
    DataFusionError::ResourcesExhausted(format!(
        "{PAST_BOUND}: {what} would take {}, past {} (the most one value may take); build \
         smaller values",
        crate::sql::size(bytes),
        crate::sql::size(bound),
    ))
}

/// Bytes of a function's input or output.
fn bytes_of(value: &ColumnarValue) -> usize {
    match value {
        ColumnarValue::Array(array) => array.get_array_memory_size(),
        ColumnarValue::Scalar(scalar) => scalar.size(),
    }
}

/// Checks a value once built, and counts it.
fn measure(name: &str, value: &ColumnarValue, budget: &Budget) -> Result<()> {
    let bytes = bytes_of(value);
    if bytes > budget.value {
        return Err(past(&format!("the result of {name}"), bytes, budget.value));
    }
    budget.spend(name, bytes)
}

/// The longest text among the rows of `value` (bytes), if it is text.
fn longest_text(value: &ColumnarValue) -> Option<usize> {
    match value {
        ColumnarValue::Scalar(scalar) => match scalar {
            ScalarValue::Utf8(s) | ScalarValue::LargeUtf8(s) | ScalarValue::Utf8View(s) => {
                Some(s.as_ref().map_or(0, String::len))
            }
            _ => None,
        },
        ColumnarValue::Array(array) => {
            let lengths: Box<dyn Iterator<Item = Option<&str>>> = match array.data_type() {
                DataType::Utf8 => Box::new(array.as_string::<i32>().iter()),
                DataType::LargeUtf8 => Box::new(array.as_string::<i64>().iter()),
                DataType::Utf8View => Box::new(array.as_string_view().iter()),
                _ => return None,
            };
            Some(lengths.map(|s| s.map_or(0, str::len)).max().unwrap_or(0))
        }
    }
}

/// The largest count among the rows of an integer `value` (negative counts build nothing).
fn largest_count(value: &ColumnarValue) -> Option<usize> {
    let to_count = |n: i64| usize::try_from(n).unwrap_or(0);
    match value {
        ColumnarValue::Scalar(scalar) => match scalar.cast_to(&DataType::Int64).ok()? {
            ScalarValue::Int64(n) => Some(n.map_or(0, to_count)),
            _ => None,
        },
        ColumnarValue::Array(array) => {
            let array = arrow::compute::cast(array, &DataType::Int64).ok()?;
            let counts = array.as_primitive::<arrow::datatypes::Int64Type>();
            Some(counts.iter().flatten().map(to_count).max().unwrap_or(0))
        }
    }
}

/// What a call to `name`, returning `returns`, may build at most, in bytes, from its arguments
/// over `rows` rows; `None` when no bound can be seen ahead (then only the result is measured).
fn ahead(name: &str, args: &[ColumnarValue], rows: usize, returns: &DataType) -> Option<usize> {
    let rows = rows.max(1);
    let text = |i: usize| args.get(i).and_then(longest_text);
    let count = |i: usize| args.get(i).and_then(largest_count);
    let per_row = match name {
        // Text repeated a number of times.
        "repeat" => text(0)?.saturating_mul(count(1)?),
        // Padded to a number of characters, four bytes at most each.
        "lpad" | "rpad" => count(1)?.saturating_mul(4).max(text(0)?),
        // Every character (and the gaps between, for an empty pattern) replaced by the
        // replacement, which may copy matched text once per reference in it.
        "replace" | "regexp_replace" => {
            let from = text(0)?;
            from.saturating_add(1)
                .saturating_mul(text(2)?.saturating_add(1))
                .saturating_add(from)
        }
        // The separator once between every two of the other arguments.
        "concat_ws" => {
            let others = args.len().saturating_sub(1);
            let rest = args.get(1..)?.iter().map(longest_text);
            text(0)?
                .saturating_mul(others)
                .saturating_add(rest.map(Option::unwrap_or_default).sum())
        }
        // Everything else that builds text or bytes builds about as much as it is given, a
        // constant once per row; anything else (numbers, flags, times) a few bytes a row,
        // which only its result shows.
        _ if !is_text_like(returns) => return None,
        _ => {
            return Some(
                args.iter()
                    .map(|arg| match arg {
                        ColumnarValue::Scalar(scalar) => scalar.size().saturating_mul(rows),
                        array => bytes_of(array),
                    })
                    .fold(0, usize::saturating_add),
            );
        }
    };
    Some(per_row.saturating_mul(rows))
}

fn is_text_like(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
    )
}

/// A function call whose values are bounded: refused ahead when they would be too large, and
/// measured once built. Everything else is the function's own; what its simplification
/// writes in is bounded the same way.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Bounded {
    inner: Arc<ScalarUDF>,
    budget: Budget,
}

impl ScalarUDFImpl for Bounded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        self.inner.inner().schema_name(args)
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs<'_>) -> Result<FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn is_strict(&self) -> bool {
        self.inner.inner().is_strict()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let name = self.inner.name();
        let bound = self.budget.value;
        if let Some(bytes) = ahead(name, &args.args, args.number_rows, args.return_type())
            && bytes > bound
        {
            return Err(past(&format!("{name}(…)"), bytes, bound));
        }
        let value = self.inner.invoke_with_args(args)?;
        measure(name, &value, &self.budget)?;
        Ok(value)
    }

    fn simplify(&self, args: Vec<Expr>, info: &SimplifyContext) -> Result<ExprSimplifyResult> {
        // A call whose constant arguments already show it past the bound is refused while the
        // statement is planned: left in the plan, its arguments (hundreds of megabytes of
        // constants folded from calls within the bound) were copied by every later pass.
        let constants: Option<Vec<ColumnarValue>> = args
            .iter()
            .map(|arg| match arg {
                Expr::Literal(value, _) => Some(ColumnarValue::Scalar(value.clone())),
                _ => None,
            })
            .collect();
        if let Some(constants) = constants {
            let name = self.inner.name();
            let types: Vec<DataType> = constants.iter().map(ColumnarValue::data_type).collect();
            let returns = self.inner.return_type(&types).unwrap_or(DataType::Null);
            let bound = self.budget.value;
            if let Some(bytes) = ahead(name, &constants, 1, &returns)
                && bytes > bound
            {
                return Err(past(&format!("{name}(…)"), bytes, bound));
            }
        }
        // Some functions are only ever run as what they simplify to (`arrow_cast` becomes a
        // cast): simplified as themselves, with any call written in bounded too.
        Ok(match self.inner.simplify(args, info)? {
            ExprSimplifyResult::Original(args) => ExprSimplifyResult::Original(args),
            ExprSimplifyResult::Simplified(expr) => {
                ExprSimplifyResult::Simplified(bound_expr(expr, &self.budget)?.data)
            }
        })
    }

    fn short_circuits(&self) -> bool {
        self.inner.short_circuits()
    }

    fn conditional_arguments<'a>(
        &self,
        args: &'a [Expr],
    ) -> Option<(Vec<&'a Expr>, Vec<&'a Expr>)> {
        self.inner.inner().conditional_arguments(args)
    }

    fn evaluate_bounds(&self, input: &[&Interval]) -> Result<Interval> {
        self.inner.evaluate_bounds(input)
    }

    fn propagate_constraints(
        &self,
        interval: &Interval,
        inputs: &[&Interval],
    ) -> Result<Option<Vec<Interval>>> {
        self.inner.propagate_constraints(interval, inputs)
    }

    fn output_ordering(&self, inputs: &[ExprProperties]) -> Result<SortProperties> {
        self.inner.output_ordering(inputs)
    }

    fn preserves_lex_ordering(&self, inputs: &[ExprProperties]) -> Result<bool> {
        self.inner.preserves_lex_ordering(inputs)
    }

    fn strictly_order_preserving(&self, inputs: &[ExprProperties]) -> Result<bool> {
        self.inner.inner().strictly_order_preserving(inputs)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }

    fn placement(&self, args: &[ExpressionPlacement]) -> ExpressionPlacement {
        self.inner.placement(args)
    }
}

/// Measures the value of the one expression it is given (a `||`), which it passes on as is;
/// its name is that expression's, so the columns of a plan keep their names.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Measured {
    signature: Signature,
    budget: Budget,
}

impl Measured {
    fn new(budget: Budget) -> Self {
        Measured {
            signature: Signature::any(1, Volatility::Immutable),
            budget,
        }
    }
}

impl ScalarUDFImpl for Measured {
    fn name(&self) -> &str {
        "measured"
    }

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        Ok(args
            .first()
            .map(|arg| arg.schema_name().to_string())
            .unwrap_or_default())
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        Ok(arg_types.first().cloned().unwrap_or(DataType::Null))
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs<'_>) -> Result<FieldRef> {
        args.arg_fields
            .first()
            .cloned()
            .ok_or_else(|| DataFusionError::Internal("measured: one argument expected".to_owned()))
    }

    fn invoke_with_args(&self, mut args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let value = args.args.pop().ok_or_else(|| {
            DataFusionError::Internal("measured: one argument expected".to_owned())
        })?;
        measure("||", &value, &self.budget)?;
        Ok(value)
    }

    fn output_ordering(&self, inputs: &[ExprProperties]) -> Result<SortProperties> {
        Ok(inputs
            .first()
            .map_or(SortProperties::Unordered, |input| input.sort_properties))
    }

    fn preserves_lex_ordering(&self, _inputs: &[ExprProperties]) -> Result<bool> {
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    /// Bounding a plan again (as after optimizing) measures each `||` once, so it counts once
    /// against the budget.
    #[tokio::test]
    async fn a_concatenation_is_measured_once_however_often_the_plan_is_bounded() {
        let ctx = SessionContext::new();
        let plan = ctx
            .sql("SELECT upper(a || 'x') || 'y' AS s FROM (VALUES ('a')) AS t(a)")
            .await
            .unwrap()
            .into_unoptimized_plan();
        let budget = Budget::new(1 << 20, 1 << 22);
        let once = bound_values(plan, &budget).unwrap();
        let twice = bound_values(once.clone(), &budget).unwrap();
        let optimized = bound_values(ctx.state().optimize(&twice).unwrap(), &budget).unwrap();
        for plan in [&once, &twice, &optimized] {
            let shown = format!("{}", plan.display_indent());
            assert_eq!(shown.matches("measured(").count(), 2, "{shown}");
            assert!(!shown.contains("measured(measured("), "{shown}");
        }
    }
}
