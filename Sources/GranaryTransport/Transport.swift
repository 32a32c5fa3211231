import GranaryMemory

/// One-sided access to the regions of the nodes in a cluster.
///
/// Every operation acts on one node's replica of a region without running code on that node's CPU:
/// over RDMA verbs it is a work request executed by the NICs; over shared memory it is a copy or an
/// atomic instruction performed by the caller on a mapping of the peer's region file.
///
/// Local buffers are plain pointers owned by the caller for the duration of the call. (A verbs
/// backend copies through memory it registered; callers need not register anything.)
///
/// Ordering guarantees, the same on every backend:
/// - A ``write(to:_:from:)`` whose length is a multiple of 8 at an 8-aligned address makes its last
///   8-byte word visible last, as an RDMA WRITE on a reliable-connected queue pair does; message
///   channels rely on this for their trailer words.
/// - A ``read(from:_:into:)`` of whole, 64-byte aligned cache lines reads each line as a unit, so
///   `ObjectLayout.check(snapshot:lines:)` detects a read that overlapped a write. A line the
///   backend could not read as a unit (it kept changing under a writer) comes back with the lock
///   bit of its first word set, which that check rejects. (Shared memory: a per-line sequence
///   lock; hardware RDMA: the NIC's DMA; software RDMA devices: two READs compared.)
/// - Atomic operations (compare-and-swap, fetch-and-add) need 8-byte aligned addresses.
public protocol Transport: AnyObject, Sendable {
    /// The node this transport acts for.
    var localNode: NodeID { get }

    /// Makes a local region reachable by peers (verbs: registers it with the NIC).
    func register(_ region: Region) throws(TransportError)

    /// The start of this node's own registered region `region`, which its CPU accesses directly
    /// (the primary's CPU locks and installs objects there).
    func localPointer(_ region: RegionID) throws(TransportError) -> UnsafeMutableRawPointer

    /// Copies `buffer.count` bytes at `address` on `node` into `buffer`. One round trip.
    func read(from node: NodeID, _ address: GlobalAddress, into buffer: UnsafeMutableRawBufferPointer) throws(TransportError)

    /// Copies the object at `address` on `node`, or the first `buffer.count / 64` lines of it, into
    /// `buffer`: whole 64-byte lines starting at the object's header line. One round trip.
    ///
    /// The same guarantee as ``read(from:_:into:)`` for an object's lines (each line whole, or
    /// rejected by `ObjectLayout.check(snapshot:lines:)`), but a backend may rely on the lines
    /// being one object's and use its header as a sequence lock over all of them (shared memory:
    /// `ObjectLayout.copyObject(from:to:lines:)`). The default is ``read(from:_:into:)``.
    func readObject(from node: NodeID, _ address: GlobalAddress, into buffer: UnsafeMutableRawBufferPointer) throws(TransportError)

    /// Copies `buffer` to `address` on `node`. Returns when the transport reports completion.
    func write(to node: NodeID, _ address: GlobalAddress, from buffer: UnsafeRawBufferPointer) throws(TransportError)

    /// Atomically replaces the 8-byte word at `address` on `node` with `desired` if it equals
    /// `expected`. Returns the word found. One round trip.
    func compareAndSwap(at node: NodeID, _ address: GlobalAddress, expected: UInt64, desired: UInt64) throws(TransportError) -> UInt64

    /// Atomically adds `delta` to the 8-byte word at `address` on `node`. Returns the word found.
    func fetchAndAdd(at node: NodeID, _ address: GlobalAddress, _ delta: UInt64) throws(TransportError) -> UInt64

    /// Issues every operation of `batch` and waits once for all of them to complete.
    ///
    /// Results of compare-and-swap and fetch-and-add land in the batch. Throws the first failure.
    func execute(_ batch: inout OperationBatch) throws(TransportError)

    /// Where the `length` bytes at `address` on `node` can be accessed with this process's own
    /// loads and stores, valid for the transport's lifetime; nil where one-sided operations are
    /// not CPU accesses (verbs). On shared memory a one-sided write *is* a store into the mapped
    /// file, so a channel sender uses this to write a message straight into the receiver's ring
    /// instead of through a staging buffer.
    func mappedAddress(of address: GlobalAddress, on node: NodeID, length: Int) -> UnsafeMutableRawPointer?

    /// A hint that the `length` bytes at `address` on `node` will be read soon: the backend may
    /// start bringing them closer without waiting for them, so that the misses of several reads a
    /// caller knows it will make overlap instead of being taken one after another. Never fails
    /// (a bad address is reported by the read itself) and has no effect on what any read returns.
    /// The default does nothing; shared memory issues the CPU's prefetch for each line.
    func prefetch(from node: NodeID, _ address: GlobalAddress, length: Int)

    /// Whether a one-sided read may see a word half-stored: the target's CPU stored it while the
    /// read copied its bytes (a software RDMA device such as rxe copies with the kernel's `memcpy`,
    /// a byte at a time under emulation). A reader of a word that must be whole (a ring's consumed
    /// counter) then reads until two reads agree. The default is false.
    var readsMayTearWords: Bool { get }

    /// A number that changes each time this transport finds that `node`'s transport was started
    /// again (its process restarted: new memory behind the same regions), 0 where it cannot tell.
    /// What a caller learned of `node`'s memory under another value (a channel's stream position
    /// and epoch in `node`'s ring) is stale: a one-sided write made from it would land in the new
    /// process's memory as foreign bytes. The transport learns of a restart before the new
    /// process can write anything into this node's memory (verbs: from the restarted node's
    /// connection request, or the acceptance of a connection to it).
    func peerGeneration(of node: NodeID) -> UInt64
}

extension Transport {
    /// An object read is a read of its lines.
    public func readObject(from node: NodeID, _ address: GlobalAddress, into buffer: UnsafeMutableRawBufferPointer) throws(TransportError) {
        try read(from: node, address, into: buffer)
    }

    /// No direct mapping (the default: operations go through the transport).
    public func mappedAddress(of address: GlobalAddress, on node: NodeID, length: Int) -> UnsafeMutableRawPointer? { nil }

    /// No effect (the default: a backend whose reads are round trips has nothing to start early).
    public func prefetch(from node: NodeID, _ address: GlobalAddress, length: Int) {}

    /// False (the default: an aligned 8-byte word is read whole).
    public var readsMayTearWords: Bool { false }

    /// 0 (the default: this transport cannot tell a restarted peer).
    public func peerGeneration(of node: NodeID) -> UInt64 { 0 }
}

/// One one-sided operation inside an ``OperationBatch``.
public struct OneSidedOperation {
    /// What an operation does: a read, a write, an 8-byte compare-and-swap or an 8-byte fetch-and-add.
    public enum Kind: UInt8, Sendable { case read, write, compareAndSwap, fetchAndAdd }

    /// What the operation does.
    public var kind: Kind
    /// The node whose memory it acts on.
    public var node: NodeID
    /// Where in that node's memory.
    public var address: GlobalAddress
    /// The local buffer (reads and writes); its bytes stay owned by the caller.
    public var buffer: UnsafeMutableRawPointer?
    /// Bytes read or written (8 for the atomics).
    public var length: Int
    /// Compare-and-swap: the expected word. Fetch-and-add: the delta.
    public var operand: UInt64
    /// Compare-and-swap: the desired word.
    public var desired: UInt64
    /// Compare-and-swap and fetch-and-add: the word found, after ``Transport/execute(_:)``.
    public var result: UInt64

    @inlinable init(kind: Kind, node: NodeID, address: GlobalAddress, buffer: UnsafeMutableRawPointer?, length: Int,
                    operand: UInt64 = 0, desired: UInt64 = 0) {
        self.kind = kind
        self.node = node
        self.address = address
        self.buffer = buffer
        self.length = length
        self.operand = operand
        self.desired = desired
        self.result = 0
    }
}

/// A batch of one-sided operations posted together and completed with one wait (a doorbell batch).
///
/// Non-copyable: it owns its operation array, which is reused across ``removeAll()`` so a hot loop
/// allocates nothing per batch.
public struct OperationBatch: ~Copyable {
    @usableFromInline let storage: UnsafeMutablePointer<OneSidedOperation>
    /// The most operations the batch holds.
    public let capacity: Int
    /// The operations added since the batch was created or emptied.
    public private(set) var count: Int = 0

    /// An empty batch with room for `capacity` operations (at least 1); adding more traps.
    public init(capacity: Int) {
        precondition(capacity > 0)
        self.capacity = capacity
        self.storage = .allocate(capacity: capacity)
    }

    deinit {
        storage.deinitialize(count: count)
        storage.deallocate()
    }

    @usableFromInline mutating func append(_ operation: OneSidedOperation) -> Int {
        precondition(count < capacity, "operation batch is full (\(capacity) operations)")
        (storage + count).initialize(to: operation)
        count += 1
        return count - 1
    }

    /// Adds a read of `buffer.count` bytes; returns its index.
    @discardableResult
    public mutating func read(from node: NodeID, _ address: GlobalAddress, into buffer: UnsafeMutableRawBufferPointer) -> Int {
        append(OneSidedOperation(kind: .read, node: node, address: address, buffer: buffer.baseAddress, length: buffer.count))
    }

    /// Adds a write of `buffer`; returns its index.
    @discardableResult
    public mutating func write(to node: NodeID, _ address: GlobalAddress, from buffer: UnsafeRawBufferPointer) -> Int {
        append(OneSidedOperation(kind: .write, node: node, address: address,
                                 buffer: UnsafeMutableRawPointer(mutating: buffer.baseAddress), length: buffer.count))
    }

    /// Adds a compare-and-swap; returns its index (the word found is ``result(_:)`` after execution).
    @discardableResult
    public mutating func compareAndSwap(at node: NodeID, _ address: GlobalAddress, expected: UInt64, desired: UInt64) -> Int {
        append(OneSidedOperation(kind: .compareAndSwap, node: node, address: address, buffer: nil, length: 8,
                                 operand: expected, desired: desired))
    }

    /// Adds a fetch-and-add; returns its index.
    @discardableResult
    public mutating func fetchAndAdd(at node: NodeID, _ address: GlobalAddress, _ delta: UInt64) -> Int {
        append(OneSidedOperation(kind: .fetchAndAdd, node: node, address: address, buffer: nil, length: 8, operand: delta))
    }

    /// The operation at `index`.
    public subscript(index: Int) -> OneSidedOperation {
        get {
            precondition(index >= 0 && index < count)
            return storage[index]
        }
        set {
            precondition(index >= 0 && index < count)
            storage[index] = newValue
        }
    }

    /// The word found by the compare-and-swap or fetch-and-add at `index`.
    public func result(_ index: Int) -> UInt64 { self[index].result }

    /// Empties the batch, keeping its storage.
    public mutating func removeAll() {
        storage.deinitialize(count: count)
        count = 0
    }
}
