//! Python binding of the hash ring: lookups take a read lock and hand back cached node-name
//! strings, so a lookup allocates nothing.

use crate::errors::Error;
use crate::ring::{Algorithm, Ring, RingConfig};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyInt, PyList, PyMapping, PyString};
use std::sync::{RwLock, RwLockReadGuard};

mod extract {
    crate::args::extractors! {
        vnodes: count1 "vnodes",
        replicas: count1 "replicas",
        weight: count1 "weight",
        n: count0 "n",
        name: text "name",
        algorithm: text "algorithm",
        epsilon: number "epsilon",
    }
}

// No Python code runs while `state`'s lock is held: a thread blocked on the lock keeps the GIL,
// so Python code under the lock (a key's `__str__`, a generator of keys, a collector run) could
// deadlock. Keys are turned into bytes before locking, and a change builds the new state outside
// the lock and swaps it in, retrying if another change landed meanwhile.
struct State {
    ring: Ring,
    /// Each node's name as a Python string, in the ring's node order.
    names: Vec<Py<PyString>>,
    /// Bumped by every change, so a change computed on an older state is redone.
    version: u64,
}

fn names_of(py: Python<'_>, ring: &Ring) -> Vec<Py<PyString>> {
    ring.nodes()
        .map(|(name, _)| PyString::new(py, name).unbind())
        .collect()
}

/// A key held as the Python object whose bytes ketama hashes: a str (encoded as UTF-8), bytes
/// as they are, or an int's (or bool's) `str()`, which is what uhashring hashes.
enum KeyBytes<'py> {
    Text(Bound<'py, PyString>),
    Raw(Bound<'py, PyBytes>),
}

impl<'py> KeyBytes<'py> {
    fn of(key: &Bound<'py, PyAny>) -> PyResult<Self> {
        if let Ok(text) = key.cast::<PyString>() {
            return Ok(KeyBytes::Text(text.clone()));
        }
        if let Ok(bytes) = key.cast::<PyBytes>() {
            return Ok(KeyBytes::Raw(bytes.clone()));
        }
        if key.is_instance_of::<PyInt>() || key.is_instance_of::<PyBool>() {
            return Ok(KeyBytes::Text(key.str()?));
        }
        Err(Error::wrong_type(
            "key",
            format!(
                "key must be a str, bytes or int (got {}).",
                key.get_type().name()?
            ),
        )
        .into())
    }

    fn bytes(&self) -> PyResult<&[u8]> {
        match self {
            KeyBytes::Text(text) => Ok(text.to_str()?.as_bytes()),
            KeyBytes::Raw(bytes) => Ok(bytes.as_bytes()),
        }
    }
}

/// Every key of an iterable, ready to hash; the iteration (Python code) happens here, unlocked.
fn keys_of<'py>(keys: &Bound<'py, PyAny>) -> PyResult<Vec<KeyBytes<'py>>> {
    if let Ok(list) = keys.cast::<PyList>() {
        return list.iter().map(|key| KeyBytes::of(&key)).collect();
    }
    let iterator = keys.try_iter().map_err(|_| {
        PyErr::from(Error::wrong_type(
            "keys",
            "keys must be an iterable of str, bytes or int keys.",
        ))
    })?;
    iterator.map(|key| KeyBytes::of(&key?)).collect()
}

fn slices<'a>(keys: &'a [KeyBytes<'_>]) -> PyResult<Vec<&'a [u8]>> {
    keys.iter().map(KeyBytes::bytes).collect()
}

/// Consistent-hash ring that places keys exactly as libketama and uhashring's ketama mode do.
///
/// >>> ring = HashRing(["cache-1", "cache-2", "cache-3"])
/// >>> ring.get_node("user:42")
/// 'cache-3'
/// >>> ring.get_nodes("user:42", 2)
/// ['cache-3', 'cache-1']
#[pyclass(frozen, module = "buttress._core")]
pub struct HashRing {
    state: RwLock<State>,
}

impl HashRing {
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies `change` to a copy of the ring and swaps it in with fresh names; only the swap
    /// holds the lock.
    fn mutate(
        &self,
        py: Python<'_>,
        change: impl Fn(&mut Ring) -> Result<(), Error>,
    ) -> PyResult<()> {
        loop {
            let (mut ring, version) = {
                let state = self.read();
                (state.ring.clone(), state.version)
            };
            change(&mut ring)?;
            let names = names_of(py, &ring);
            let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
            if state.version == version {
                *state = State {
                    ring,
                    names,
                    version: version + 1,
                };
                return Ok(());
            }
        }
    }
}

/// The `nodes=` argument: names (weight 1) or a mapping of names to weights.
fn parse_nodes(nodes: &Bound<'_, PyAny>) -> PyResult<Vec<(String, u32)>> {
    let weighted = |name: Bound<'_, PyAny>, weight: Bound<'_, PyAny>| -> PyResult<(String, u32)> {
        Ok((extract::name(&name)?, extract::weight(&weight)?))
    };
    if let Ok(mapping) = nodes.cast::<PyMapping>() {
        if !nodes.is_instance_of::<PyString>() {
            return mapping
                .items()?
                .iter()
                .map(|item| {
                    let (name, weight) = item.extract::<(Bound<'_, PyAny>, Bound<'_, PyAny>)>()?;
                    weighted(name, weight)
                })
                .collect();
        }
    }
    if nodes.is_instance_of::<PyString>() || nodes.is_instance_of::<PyBytes>() {
        return Err(Error::wrong_type(
            "nodes",
            "nodes must be an iterable of node names or a mapping of names to weights, not a \
             single string.",
        )
        .into());
    }
    let iterator = nodes.try_iter().map_err(|_| {
        PyErr::from(Error::wrong_type(
            "nodes",
            "nodes must be an iterable of node names or a mapping of names to weights.",
        ))
    })?;
    iterator
        .map(|name| Ok((extract::name(&name?)?, 1)))
        .collect()
}

#[pymethods]
impl HashRing {
    #[new]
    #[pyo3(signature = (nodes = None, *, algorithm = "ketama".to_owned(), vnodes = 40, replicas = 4))]
    #[pyo3(text_signature = "(nodes=None, *, algorithm='ketama', vnodes=40, replicas=4)")]
    fn new(
        py: Python<'_>,
        nodes: Option<&Bound<'_, PyAny>>,
        #[pyo3(from_py_with = extract::algorithm)] algorithm: String,
        #[pyo3(from_py_with = extract::vnodes)] vnodes: u32,
        #[pyo3(from_py_with = extract::replicas)] replicas: u32,
    ) -> PyResult<Self> {
        let algorithm = Algorithm::parse(&algorithm)?;
        let mut ring = Ring::new(RingConfig {
            algorithm,
            vnodes,
            replicas,
        })?;
        if let Some(nodes) = nodes.filter(|nodes| !nodes.is_none()) {
            let nodes = parse_nodes(nodes)?;
            ring.add_nodes(nodes.iter().map(|(name, weight)| (name.as_str(), *weight)))?;
        }
        Ok(HashRing {
            state: RwLock::new(State {
                names: names_of(py, &ring),
                ring,
                version: 0,
            }),
        })
    }

    /// The node that owns `key` (a str, bytes or int).
    fn get_node(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<Py<PyString>> {
        let key = KeyBytes::of(key)?;
        let bytes = key.bytes()?;
        let state = self.read();
        let owner = state.ring.lookup(bytes).ok_or(Error::EmptyRing)?;
        Ok(state.names[owner].clone_ref(py))
    }

    /// The key's owner and the next `n - 1` distinct nodes clockwise: where its replicas go.
    fn get_nodes<'py>(
        &self,
        py: Python<'py>,
        key: &Bound<'py, PyAny>,
        #[pyo3(from_py_with = extract::n)] n: u32,
    ) -> PyResult<Bound<'py, PyList>> {
        let key = KeyBytes::of(key)?;
        let bytes = key.bytes()?;
        let (owners, names) = {
            let state = self.read();
            if state.ring.is_empty() && n > 0 {
                return Err(Error::EmptyRing.into());
            }
            let owners = state.ring.lookup_n(bytes, n as usize)?;
            let names: Vec<Py<PyString>> = owners
                .iter()
                .map(|owner| state.names[*owner].clone_ref(py))
                .collect();
            (owners, names)
        };
        debug_assert_eq!(owners.len(), names.len());
        PyList::new(py, names)
    }

    /// The owner of every key in `keys`, in order, in one call.
    fn get_node_many<'py>(
        &self,
        py: Python<'py>,
        keys: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let keys = keys_of(keys)?;
        let slices = slices(&keys)?;
        let mut owners = Vec::with_capacity(slices.len());
        let names: Vec<Py<PyString>> = {
            let state = self.read();
            state.ring.lookup_many(&slices, &mut owners)?;
            owners
                .iter()
                .map(|owner| state.names[*owner].clone_ref(py))
                .collect()
        };
        PyList::new(py, names)
    }

    /// Adds a node with a weight (its share of points, relative to the others).
    #[pyo3(signature = (name, weight = 1))]
    fn add_node(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = extract::name)] name: String,
        #[pyo3(from_py_with = extract::weight)] weight: u32,
    ) -> PyResult<()> {
        self.mutate(py, |ring| ring.add_node(&name, weight))
    }

    /// Removes a node. With equal weights only the keys it owned move (to the next nodes
    /// clockwise); ketama shares points by weight over the total, so with unequal weights a
    /// few other keys move as well.
    fn remove_node(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = extract::name)] name: String,
    ) -> PyResult<()> {
        self.mutate(py, |ring| ring.remove_node(&name))
    }

    /// Changes a node's weight.
    fn set_weight(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = extract::name)] name: String,
        #[pyo3(from_py_with = extract::weight)] weight: u32,
    ) -> PyResult<()> {
        self.mutate(py, |ring| ring.set_weight(&name, weight))
    }

    /// A node's weight.
    fn weight(&self, #[pyo3(from_py_with = extract::name)] name: String) -> PyResult<u32> {
        Ok(self.read().ring.weight(&name)?)
    }

    /// Every node's weight, in the order the nodes were added.
    #[getter]
    fn weights<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let pairs: Vec<(Py<PyString>, u32)> = {
            let state = self.read();
            let weights = state.ring.nodes().map(|(_, weight)| weight);
            state
                .names
                .iter()
                .map(|name| name.clone_ref(py))
                .zip(weights)
                .collect()
        };
        let weights = PyDict::new(py);
        for (name, weight) in pairs {
            weights.set_item(name, weight)?;
        }
        Ok(weights)
    }

    /// How many points each node owns on the ring.
    #[getter]
    fn points<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let pairs: Vec<(Py<PyString>, usize)> = {
            let state = self.read();
            let counts = state.ring.points_per_node();
            state
                .names
                .iter()
                .map(|name| name.clone_ref(py))
                .zip(counts)
                .collect()
        };
        let points = PyDict::new(py);
        for (name, count) in pairs {
            points.set_item(name, count)?;
        }
        Ok(points)
    }

    /// How many keys of `keys` each node owns (every node listed, also with none).
    fn distribution<'py>(
        &self,
        py: Python<'py>,
        keys: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let keys = keys_of(keys)?;
        let slices = slices(&keys)?;
        let mut owners = Vec::with_capacity(slices.len());
        let (counts, names) = {
            let state = self.read();
            state.ring.lookup_many(&slices, &mut owners)?;
            let mut counts = vec![0u64; state.names.len()];
            for owner in &owners {
                counts[*owner] += 1;
            }
            let names: Vec<Py<PyString>> =
                state.names.iter().map(|name| name.clone_ref(py)).collect();
            (counts, names)
        };
        let result = PyDict::new(py);
        for (count, name) in counts.into_iter().zip(names) {
            result.set_item(name, count)?;
        }
        Ok(result)
    }

    /// An independent copy, to try a change (and see what it would move) before making it.
    fn copy(&self, py: Python<'_>) -> HashRing {
        let state = self.read();
        HashRing {
            state: RwLock::new(State {
                ring: state.ring.clone(),
                names: state.names.iter().map(|name| name.clone_ref(py)).collect(),
                version: 0,
            }),
        }
    }

    /// The placement algorithm: 'ketama', 'rendezvous' or 'jump'.
    #[getter]
    fn algorithm(&self) -> &'static str {
        self.read().ring.config().algorithm.name()
    }

    /// The node for `key` with consistent hashing with bounded loads (Mirrokni et al.): the
    /// first of the key's nodes, in its ring order, whose load (from `loads`, a mapping of node
    /// names to counts; missing means 0) is below `ceil((1 + epsilon) * (total + 1) / nodes)`,
    /// so no node takes more than about `1 + epsilon` times the mean.
    #[pyo3(signature = (key, loads, *, epsilon = 0.25))]
    fn get_node_bounded(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        loads: &Bound<'_, PyAny>,
        #[pyo3(from_py_with = extract::epsilon)] epsilon: f64,
    ) -> PyResult<Py<PyString>> {
        if !(epsilon.is_finite() && epsilon > 0.0) {
            return Err(Error::invalid(
                "epsilon",
                format!("epsilon must be a number above 0 (got {epsilon})."),
            )
            .into());
        }
        let key = KeyBytes::of(key)?;
        let bytes = key.bytes()?;
        let candidates: Vec<Py<PyString>> = {
            let state = self.read();
            if state.ring.is_empty() {
                return Err(Error::EmptyRing.into());
            }
            let placed = state.ring.placed_nodes();
            state
                .ring
                .lookup_n(bytes, placed)?
                .into_iter()
                .map(|owner| state.names[owner].clone_ref(py))
                .collect()
        };
        // The loads are Python objects: read them only now, with the ring's lock released.
        let mut counts = Vec::with_capacity(candidates.len());
        for name in &candidates {
            let load = match loads.get_item(name) {
                Ok(load) => load.extract::<u64>().map_err(|_| {
                    PyErr::from(Error::wrong_type(
                        "loads",
                        format!(
                            "loads must map node names to whole numbers (got {} for '{name}').",
                            load.repr().map(|r| r.to_string()).unwrap_or_default()
                        ),
                    ))
                })?,
                Err(error) if error.is_instance_of::<pyo3::exceptions::PyKeyError>(py) => 0,
                Err(error) => return Err(error),
            };
            counts.push(load);
        }
        let total: u64 = counts.iter().sum();
        let capacity = ((1.0 + epsilon) * (total + 1) as f64 / candidates.len() as f64).ceil();
        let chosen = counts
            .iter()
            .position(|load| (*load as f64) < capacity)
            .unwrap_or(0);
        Ok(candidates[chosen].clone_ref(py))
    }

    /// Labels per node at average weight.
    #[getter]
    fn vnodes(&self) -> u32 {
        self.read().ring.config().vnodes
    }

    /// Points per label (MD5 words used).
    #[getter]
    fn replicas(&self) -> u32 {
        self.read().ring.config().replicas
    }

    fn __len__(&self) -> usize {
        self.read().ring.len()
    }

    fn __contains__(&self, name: &Bound<'_, PyAny>) -> PyResult<bool> {
        Ok(match name.cast::<PyString>() {
            Ok(name) => {
                let name = name.to_str()?;
                self.read().ring.index_of(name).is_some()
            }
            Err(_) => false,
        })
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let names: Vec<Py<PyString>> = {
            let state = self.read();
            state.names.iter().map(|name| name.clone_ref(py)).collect()
        };
        PyList::new(py, names)?.try_iter().map(Bound::into_any)
    }

    fn __repr__(&self) -> String {
        let state = self.read();
        let names: Vec<String> = state
            .ring
            .nodes()
            .map(|(name, weight)| {
                if weight == 1 {
                    format!("'{name}'")
                } else {
                    format!("'{name}': {weight}")
                }
            })
            .collect();
        format!("HashRing([{}])", names.join(", "))
    }
}
