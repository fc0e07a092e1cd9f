//! The crate's module graph has no cycles (apart from the tensor and its tape, one unit): each
//! `src/**/*.rs` file is a module, an edge is a `crate::a::b` or `super::…` path in its code
//! (comments stripped), resolved to the longest module prefix; edges between a module and its
//! own ancestors or descendants are a parent and its parts, not layering, and are ignored.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Module = Vec<String>;

fn modules(root: &Path) -> BTreeMap<Module, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(root).unwrap().with_extension("");
                let mut m: Module = rel.iter().map(|c| c.to_string_lossy().into()).collect();
                if matches!(m.last().map(String::as_str), Some("mod" | "lib" | "main")) {
                    m.pop();
                }
                out.insert(m, std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    out
}

/// The code without `//` comments (doc comments name paths that are not dependencies).
fn strip_comments(src: &str) -> String {
    src.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `crate::x::y` / `super::…::x` path in `code`, as segments (with `super` resolved
/// against `m`).
fn paths(m: &Module, code: &str) -> Vec<Module> {
    let mut out = vec![];
    let b = code.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < b.len() {
        if !word(b[i]) || (i > 0 && word(b[i - 1])) {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < b.len() && (word(b[j]) || (b[j] == b':' && b.get(j + 1) == Some(&b':'))) {
            j += if b[j] == b':' { 2 } else { 1 };
        }
        let segs: Vec<&str> = code[i..j].split("::").filter(|s| !s.is_empty()).collect();
        i = j.max(i + 1);
        match segs.first() {
            Some(&"crate") => out.push(segs[1..].iter().map(|s| s.to_string()).collect()),
            Some(&"super") => {
                let ups = segs.iter().take_while(|s| **s == "super").count();
                if ups <= m.len() {
                    let mut p: Module = m[..m.len() - ups].to_vec();
                    p.extend(segs[ups..].iter().map(|s| s.to_string()));
                    out.push(p);
                }
            }
            _ => {}
        }
    }
    out
}

fn resolve(mods: &BTreeMap<Module, String>, p: &Module) -> Option<Module> {
    (1..=p.len())
        .rev()
        .map(|n| p[..n].to_vec())
        .find(|c| mods.contains_key(c))
}

fn related(a: &Module, b: &Module) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct T<'a> {
        edges: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<Module, usize>,
        low: BTreeMap<Module, usize>,
        stack: Vec<Module>,
        on: BTreeSet<Module>,
        out: Vec<Vec<Module>>,
    }
    fn visit(t: &mut T, v: &Module) {
        let n = t.index.len();
        t.index.insert(v.clone(), n);
        t.low.insert(v.clone(), n);
        t.stack.push(v.clone());
        t.on.insert(v.clone());
        for w in &t.edges[v] {
            if !t.index.contains_key(w) {
                visit(t, w);
                let l = t.low[v].min(t.low[w]);
                t.low.insert(v.clone(), l);
            } else if t.on.contains(w) {
                let l = t.low[v].min(t.index[w]);
                t.low.insert(v.clone(), l);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = vec![];
            while let Some(w) = t.stack.pop() {
                t.on.remove(&w);
                let done = &w == v;
                comp.push(w);
                if done {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: vec![],
        on: BTreeSet::new(),
        out: vec![],
    };
    for v in edges.keys() {
        if !t.index.contains_key(v) {
            visit(&mut t, v);
        }
    }
    t.out
}

fn graph(root: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let mods = modules(root);
    let mut edges = BTreeMap::new();
    for (m, src) in &mods {
        let e: BTreeSet<Module> = paths(m, &strip_comments(src))
            .iter()
            .filter_map(|p| resolve(&mods, p))
            .filter(|t| !related(m, t))
            .collect();
        edges.insert(m.clone(), e);
    }
    edges
}

#[test]
fn module_graph_has_no_cycles() {
    let edges = graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(edges.len() > 50, "found only {} modules", edges.len());
    // The tensor and its tape call each other by design (backward lives on the tensor).
    let allowed: Vec<Module> = vec![vec!["autograd".into()], vec!["tensor".into()]];
    let found = cycles(&edges);
    for c in &found {
        println!("cycle: {c:?}");
    }
    let bad: Vec<_> = found.iter().filter(|c| **c != allowed).collect();
    assert!(bad.is_empty(), "module cycles: {bad:?}");
}

/// The checker finds a planted cycle (so the test above can fail).
#[test]
fn the_cycle_check_finds_a_planted_cycle() {
    let dir = std::env::temp_dir().join(format!("sd2-arch-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("b")).unwrap();
    std::fs::write(dir.join("lib.rs"), "pub mod a; pub mod b;").unwrap();
    std::fs::write(dir.join("a.rs"), "use crate::b::c::f; // crate::d\n").unwrap();
    std::fs::write(dir.join("b/mod.rs"), "pub mod c;").unwrap();
    std::fs::write(dir.join("b/c.rs"), "fn g() { super::super::a::h() }").unwrap();
    let edges = graph(&dir);
    std::fs::remove_dir_all(&dir).ok();
    let found = cycles(&edges);
    let want: Vec<Module> = vec![vec!["a".into()], vec!["b".into(), "c".into()]];
    assert_eq!(found, vec![want]);
}
