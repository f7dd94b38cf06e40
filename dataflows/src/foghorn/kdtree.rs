//! A k-d tree over node positions (unit vectors) and static scores for branch-and-bound routing.
//!
//! Each subtree knows the box around its nodes' unit vectors and the highest static score
//! (cpu + ram + bw) among them. For a client, the largest dot product with any point of a box
//! bounds the cosine of the closest angle, so `best static + geo bound + bonus + tags` bounds
//! every score inside; subtrees are opened depth first, the better bound first, and skipped
//! when their bound cannot beat the candidates held.
//!
//! A cell is split along whichever spread is widest in points of score: one of the three axes
//! of position (an angle's worth of the geo weight) or the static score itself. With the default
//! weights the static scores of a fleet spread over more points than a continent's worth of geo
//! term, so splitting on position alone leaves in every cell some node with a high static score,
//! and every cell within a quarter of the globe has to be opened; grouping by score as well
//! lets the bound of a cell of lightly loaded nodes differ from that of its busy neighbours.
//!
//! The shape is fixed when the tree is built: a change of load refreshes the bounds along one
//! path and nothing else. Bounds stay correct as scores drift, only looser, so the snapshot
//! rebuilds the tree after a share of its nodes has changed ([`Tree::rebuilt`]).

use std::sync::Arc;

/// Most nodes in a leaf.
const LEAF: usize = 8;

#[derive(Clone, Debug)]
struct Cell {
    lo: [f64; 3],
    hi: [f64; 3],
    /// Highest static sum of a routable node inside, `None` when there is none.
    best: Option<u64>,
    start: u32,
    end: u32,
    children: Option<(u32, u32)>,
    parent: u32,
}

/// The tree; items are node indices. Everything but the cells' bounds is fixed once built, so
/// a patched snapshot shares it.
#[derive(Clone, Debug, Default)]
pub struct Tree {
    cells: Vec<Cell>,
    shape: Arc<Shape>,
}

#[derive(Debug, Default)]
struct Shape {
    items: Vec<u32>,
    points: Vec<[f64; 3]>,
    /// Leaf cell of each node index (`u32::MAX` for nodes without a place).
    leaf_of: Vec<u32>,
}

/// The geo term's upper bound for a cosine bound (see [`super::score::geo_term`]).
pub fn geo_bound(weight: u64, cos_bound: f64) -> u64 {
    if weight == 0 {
        return 0;
    }
    // The margin covers rounding between this dot product and the trigonometric form.
    let d = (cos_bound + 1e-9).clamp(-1.0, 1.0).acos() / std::f64::consts::PI;
    weight.saturating_sub((weight as f64 * d) as u64)
}

impl Tree {
    /// Builds the tree over `(node index, unit vector)` for `count` nodes in all; `sum` gives a
    /// node's static sum when it is routable, `geo_weight` weighs position against it.
    pub fn build(
        placed: &[(u32, [f64; 3])],
        count: usize,
        geo_weight: u64,
        sum: impl Fn(u32) -> Option<u64>,
    ) -> Tree {
        let mut shape = Shape {
            items: Vec::new(),
            points: vec![[0.0; 3]; count],
            leaf_of: vec![u32::MAX; count],
        };
        for &(index, point) in placed {
            shape.points[index as usize] = point;
        }
        let mut cells = Vec::with_capacity(placed.len() / LEAF * 2 + 1);
        let mut items: Vec<u32> = placed.iter().map(|p| p.0).collect();
        if !items.is_empty() {
            let mut split = Split {
                cells: &mut cells,
                shape: &mut shape,
                // Points of geo term per unit of distance between unit vectors (about a radian).
                per_unit: geo_weight as f64 / std::f64::consts::PI,
                sum: &sum,
            };
            split.cell(&mut items, 0, u32::MAX);
        }
        shape.items = items;
        Tree {
            cells,
            shape: Arc::new(shape),
        }
    }

    /// The same nodes in a tree shaped afresh for the current static sums.
    pub fn rebuilt(&self, geo_weight: u64, sum: impl Fn(u32) -> Option<u64>) -> Tree {
        let placed: Vec<(u32, [f64; 3])> = self
            .shape
            .leaf_of
            .iter()
            .enumerate()
            .filter(|(_, leaf)| **leaf != u32::MAX)
            .map(|(index, _)| (index as u32, self.shape.points[index]))
            .collect();
        Tree::build(&placed, self.shape.leaf_of.len(), geo_weight, sum)
    }

    /// True when node `index` has a place in the tree.
    pub fn contains(&self, index: u32) -> bool {
        self.shape
            .leaf_of
            .get(index as usize)
            .is_some_and(|&leaf| leaf != u32::MAX)
    }

    /// True when node `index` sits at `point` in the tree (or is absent and `point` is none).
    pub fn placed_at(&self, index: u32, point: Option<[f64; 3]>) -> bool {
        match (self.shape.leaf_of.get(index as usize), point) {
            (Some(&u32::MAX), None) => true,
            (Some(&leaf), Some(p)) if leaf != u32::MAX => self.shape.points[index as usize] == p,
            _ => false,
        }
    }

    /// Refreshes the bounds on the path from node `index` to the root.
    pub fn update(&mut self, index: u32, sum: impl Fn(u32) -> Option<u64>) {
        let Some(&leaf) = self.shape.leaf_of.get(index as usize) else {
            return;
        };
        if leaf == u32::MAX {
            return;
        }
        let cell = &self.cells[leaf as usize];
        let mut best = self.shape.items[cell.start as usize..cell.end as usize]
            .iter()
            .filter_map(|&i| sum(i))
            .max();
        let mut at = leaf;
        loop {
            self.cells[at as usize].best = best;
            let parent = self.cells[at as usize].parent;
            if parent == u32::MAX {
                return;
            }
            let (l, r) = self.cells[parent as usize]
                .children
                .expect("a parent has children");
            best = self.cells[l as usize].best.max(self.cells[r as usize].best);
            at = parent;
        }
    }

    /// Visits nodes, the better bound first. `extra` is added to every bound (stream bonus and
    /// positive tag adjustments); `visit` scores a node and returns the score a node must
    /// beat from now on (`None` while fewer than the wanted candidates are held).
    pub fn search(
        &self,
        client: [f64; 3],
        geo_weight: u64,
        extra: u64,
        mut worst: Option<u64>,
        mut visit: impl FnMut(u32) -> Option<u64>,
    ) {
        let Some(root) = self.cells.first() else {
            return;
        };
        let bound = |cell: &Cell| -> Option<u64> {
            let best = cell.best?;
            let dot: f64 = client
                .iter()
                .zip(cell.lo.iter().zip(&cell.hi))
                .map(|(q, (lo, hi))| (q * lo).max(q * hi))
                .sum();
            Some(best + geo_bound(geo_weight, dot) + extra)
        };
        // Depth first, the child with the better bound first: cheaper than a priority queue,
        // and the good candidates it finds early prune the rest.
        let mut open: Vec<(u64, u32)> = Vec::with_capacity(64);
        if let Some(b) = bound(root) {
            open.push((b, 0));
        }
        while let Some((b, id)) = open.pop() {
            if worst.is_some_and(|w| b < w) {
                continue;
            }
            let cell = &self.cells[id as usize];
            match cell.children {
                None => {
                    for &index in &self.shape.items[cell.start as usize..cell.end as usize] {
                        worst = visit(index);
                    }
                }
                Some((left, right)) => {
                    let l = bound(&self.cells[left as usize]).map(|b| (b, left));
                    let r = bound(&self.cells[right as usize]).map(|b| (b, right));
                    let (first, second) = if l.map(|x| x.0) >= r.map(|x| x.0) {
                        (l, r)
                    } else {
                        (r, l)
                    };
                    // The stack pops the last pushed: push the weaker child first.
                    open.extend(second);
                    open.extend(first);
                }
            }
        }
    }
}

/// What building needs while it recurses.
struct Split<'a, F> {
    cells: &'a mut Vec<Cell>,
    shape: &'a mut Shape,
    per_unit: f64,
    sum: &'a F,
}

impl<F: Fn(u32) -> Option<u64>> Split<'_, F> {
    /// A node's static sum for the split (nodes no request can have count as 0).
    fn key(&self, i: u32) -> u64 {
        (self.sum)(i).unwrap_or(0)
    }

    /// Makes the cell over `items` (which start at `offset` of the final order) and its subtree;
    /// returns the cell's id.
    fn cell(&mut self, items: &mut [u32], offset: usize, parent: u32) -> u32 {
        let mut lo = [f64::INFINITY; 3];
        let mut hi = [f64::NEG_INFINITY; 3];
        let (mut least, mut most) = (u64::MAX, 0);
        for &i in items.iter() {
            let p = self.shape.points[i as usize];
            for axis in 0..3 {
                lo[axis] = lo[axis].min(p[axis]);
                hi[axis] = hi[axis].max(p[axis]);
            }
            let key = self.key(i);
            least = least.min(key);
            most = most.max(key);
        }
        let id = u32::try_from(self.cells.len()).expect("fewer than 2^32 cells");
        self.cells.push(Cell {
            lo,
            hi,
            best: None,
            start: offset as u32,
            end: (offset + items.len()) as u32,
            children: None,
            parent,
        });
        if items.len() <= LEAF {
            for &i in items.iter() {
                self.shape.leaf_of[i as usize] = id;
            }
            self.cells[id as usize].best = items.iter().filter_map(|&i| (self.sum)(i)).max();
            return id;
        }
        // The widest spread in points of score: axes 0–2 are position, 3 the static sum.
        let spread = |axis: usize| {
            if axis == 3 {
                (most - least) as f64
            } else {
                (hi[axis] - lo[axis]) * self.per_unit
            }
        };
        let axis = (0..4)
            .max_by(|&a, &b| spread(a).total_cmp(&spread(b)))
            .unwrap_or(0);
        let mid = items.len() / 2;
        if axis == 3 {
            items.select_nth_unstable_by_key(mid, |&i| self.key(i));
        } else {
            let points = &self.shape.points;
            items.select_nth_unstable_by(mid, |&a, &b| {
                points[a as usize][axis].total_cmp(&points[b as usize][axis])
            });
        }
        let (left_items, right_items) = items.split_at_mut(mid);
        let left = self.cell(left_items, offset, id);
        let right = self.cell(right_items, offset + mid, id);
        let best = self.cells[left as usize]
            .best
            .max(self.cells[right as usize].best);
        let cell = &mut self.cells[id as usize];
        cell.children = Some((left, right));
        cell.best = best;
        id
    }
}
