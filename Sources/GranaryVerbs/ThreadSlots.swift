import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A transport's thread slots: the first `capacity` threads that operate through the transport
/// each get a slot of their own, and with it their own connection (queue pair, completion queue,
/// staging buffer, work-request arrays) towards every peer they talk to. A thread that finds every
/// slot taken uses slot `capacity`, the connection per peer that such threads share in turns.
///
/// A thread's slot is found through thread-local storage (one process-wide `pthread_key_t`, whose
/// value is the thread's ``ThreadSlotTable``): the lookup allocates only at the thread's first
/// operation through a transport. When the thread exits, its slots go back to their transports'
/// free lists; the connections stay up for the next thread that takes the slot. A thread that got
/// the shared slot keeps it (it is not offered a freed slot later).
///
/// `@unchecked Sendable`: `free` is read and written only while `mutex` is held; `closed` is an
/// atomic; `capacity` is immutable.
final class ThreadSlots: @unchecked Sendable {
    /// The number of own slots; slot `capacity` is the shared one.
    let capacity: Int
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private var free: [Int]
    private let closed = Atomic<Bool>(false)

    init(capacity: Int) {
        self.capacity = capacity
        free = Array((0..<capacity).reversed())
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    /// The calling thread's slot: `0..<capacity`, or `capacity` for the shared connections.
    @inline(__always)
    func current() -> Int {
        if let raw = pthread_getspecific(threadSlotKey) {
            let table = Unmanaged<ThreadSlotTable>.fromOpaque(raw).takeUnretainedValue()
            if let slot = table.slot(in: self) { return slot }
            return table.add(self)
        }
        let table = ThreadSlotTable()
        pthread_setspecific(threadSlotKey, Unmanaged.passRetained(table).toOpaque())
        return table.add(self)
    }

    /// Whether the transport is gone (its entries in thread tables are pruned).
    var isClosed: Bool { closed.load(ordering: .acquiring) }

    /// Called by the transport's teardown: slots are no longer handed out or taken back.
    func close() { closed.store(true, ordering: .releasing) }

    /// A free slot, or `capacity` (shared) if every slot is taken.
    fileprivate func take() -> Int {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return free.popLast() ?? capacity
    }

    /// Gives back `slot` (the thread that held it exited).
    fileprivate func give(_ slot: Int) {
        guard slot < capacity, !isClosed else { return }
        pthread_mutex_lock(mutex)
        free.append(slot)
        pthread_mutex_unlock(mutex)
    }
}

/// One thread's slots, one entry per transport it has used. Touched only by its own thread (and by
/// the key's destructor, on that thread, as it exits).
final class ThreadSlotTable {
    private struct Entry {
        let slots: ThreadSlots
        let slot: Int
    }
    private var entries: [Entry] = []

    @inline(__always)
    func slot(in slots: ThreadSlots) -> Int? {
        for entry in entries where entry.slots === slots { return entry.slot }
        return nil
    }

    /// Takes a slot of `slots` for this thread (dropping entries of transports that are gone).
    func add(_ slots: ThreadSlots) -> Int {
        entries.removeAll { $0.slots.isClosed }
        let slot = slots.take()
        entries.append(Entry(slots: slots, slot: slot))
        return slot
    }

    /// The thread is exiting: its slots go back.
    func threadExited() {
        for entry in entries { entry.slots.give(entry.slot) }
        entries.removeAll()
    }
}

/// The process-wide key of each thread's ``ThreadSlotTable`` (retained by the thread; released
/// by the destructor when the thread exits).
let threadSlotKey: pthread_key_t = {
    var key = pthread_key_t()
    let result = pthread_key_create(&key) { raw in
        guard let raw else { return }
        Unmanaged<ThreadSlotTable>.fromOpaque(raw).takeRetainedValue().threadExited()
    }
    precondition(result == 0, "pthread_key_create failed: \(result)")
    return key
}()
