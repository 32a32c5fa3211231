import Granary

/// TATP (Telecom Application Transaction Processing), FaRM's headline workload, as specified in
/// docs/WORKLOADS.md: four tables plus the sub_nbr secondary index, NURand keys, the 7-transaction mix.
///
/// Tables are ``TransactionalHashTable``s keyed as follows (sub_nbr is s_id as a 15-digit string,
/// stored as its numeric value):
/// - Subscriber: s_id;  Access_Info: s_id << 3 | ai_type;  Special_Facility: s_id << 3 | sf_type;
/// - Call_Forwarding: (s_id << 3 | sf_type) << 5 | start_time;  sub_nbr index: sub_nbr -> s_id.
package struct TATPWorkload: Workload {
    package struct Subscriber: Sendable, BitwiseCopyable {
        package var subNbr: UInt64
        package var hex: UInt64  // hex_1..10, one nibble each
        package var bits: UInt16  // bit_1..10
        package var byte2: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8)
        package var mscLocation: UInt32
        package var vlrLocation: UInt32
    }
    package struct AccessInfo: Sendable, BitwiseCopyable {
        package var data1: UInt8, data2: UInt8
        package var data3: (UInt8, UInt8, UInt8)
        package var data4: (UInt8, UInt8, UInt8, UInt8, UInt8)
    }
    package struct SpecialFacility: Sendable, BitwiseCopyable {
        package var isActive: UInt8, errorCntrl: UInt8, dataA: UInt8
        package var dataB: (UInt8, UInt8, UInt8, UInt8, UInt8)
    }
    package struct CallForwarding: Sendable, BitwiseCopyable {
        package var endTime: UInt8
        package var numberx: UInt64
    }

    package static let types = ["GET_SUBSCRIBER_DATA", "GET_NEW_DESTINATION", "GET_ACCESS_DATA", "UPDATE_SUBSCRIBER_DATA",
                               "UPDATE_LOCATION", "INSERT_CALL_FORWARDING", "DELETE_CALL_FORWARDING"]
    /// Cumulative mix in percent, in the order of ``types``.
    static let mix = [35, 45, 80, 82, 96, 98, 100]

    package let subscribers: Int
    package let seed: UInt64
    let a: Int
    var subscriber: TransactionalHashTable<Subscriber>?
    var accessInfo: TransactionalHashTable<AccessInfo>?
    var specialFacility: TransactionalHashTable<SpecialFacility>?
    var callForwarding: TransactionalHashTable<CallForwarding>?
    var subNbrIndex: TransactionalHashTable<UInt64>?
    /// Call_Forwarding rows after loading.
    package private(set) var loadedCallForwarding = 0

    /// - Parameter scale: N = 100,000 x scale subscribers (fractions allowed for quick runs).
    package init(scale: Double = 1, seed: UInt64 = 1) {
        subscribers = max(1, Int(100_000 * scale))
        self.seed = seed
        a = subscribers <= 1_000_000 ? 65_535 : (subscribers <= 10_000_000 ? 1_048_575 : 2_097_151)
    }

    package var transactionTypes: [String] { Self.types }

    static func aiKey(_ s: Int, _ type: Int) -> UInt64 { UInt64(s) << 3 | UInt64(type) }
    static func sfKey(_ s: Int, _ type: Int) -> UInt64 { UInt64(s) << 3 | UInt64(type) }
    static func cfKey(_ s: Int, _ type: Int, _ start: Int) -> UInt64 { (UInt64(s) << 3 | UInt64(type)) << 5 | UInt64(start) }

    /// NURand(A, 1, N) = ((rand(0, A) | rand(1, N)) % N) + 1.
    func nurand(_ random: inout WorkloadRandom) -> Int {
        ((random.uniform(0...a) | random.uniform(1...subscribers)) % subscribers) + 1
    }

    static func bytes<T>(_ random: inout WorkloadRandom, _ value: T) -> T {
        var value = value
        withUnsafeMutableBytes(of: &value) { for i in $0.indices { $0[i] = UInt8(truncatingIfNeeded: random.next()) } }
        return value
    }

    package mutating func load(into cluster: Cluster) async throws {
        let n = subscribers
        subscriber = try await .create(name: "subscriber", capacity: n, in: cluster)
        subNbrIndex = try await .create(name: "sub_nbr", capacity: n, in: cluster)
        accessInfo = try await .create(name: "access_info", capacity: n * 5 / 2 + 64, in: cluster)
        specialFacility = try await .create(name: "special_facility", capacity: n * 5 / 2 + 64, in: cluster)
        callForwarding = try await .create(name: "call_forwarding", capacity: n * 4 + 64, in: cluster)
        let tables = (subscriber!, subNbrIndex!, accessInfo!, specialFacility!, callForwarding!)
        let seed = self.seed
        let batch = max(1, cluster.nodes[0].engine.maximumRecordBytes / 2_048)
        loadedCallForwarding = try await withThrowingTaskGroup(of: Int.self) { group in
            for (index, node) in cluster.nodes.enumerated() {
                group.addTask {
                    var cf = 0
                    for first in stride(from: 1 + index * batch, through: n, by: batch * cluster.nodes.count) {
                        let last = min(first + batch - 1, n)
                        cf += try await loadTransaction(on: node) { tx in
                            var rows = 0
                            for s in first...last {
                                var random = WorkloadRandom(seed: seed &+ UInt64(s) &* 0x1_0000_0001)
                                var row = Self.bytes(&random, Subscriber(subNbr: 0, hex: 0, bits: 0, byte2: (0, 0, 0, 0, 0, 0, 0, 0, 0, 0), mscLocation: 0, vlrLocation: 0))
                                row.subNbr = UInt64(s)
                                row.bits &= 0x3FF
                                try tables.0.insert(UInt64(s), row, in: tx)
                                try tables.1.insert(UInt64(s), UInt64(s), in: tx)
                                for type in Self.distinctTypes(&random, count: random.uniform(1...4)) {
                                    try tables.2.insert(Self.aiKey(s, type), Self.bytes(&random, AccessInfo(data1: 0, data2: 0, data3: (0, 0, 0), data4: (0, 0, 0, 0, 0))), in: tx)
                                }
                                for type in Self.distinctTypes(&random, count: random.uniform(1...4)) {
                                    var facility = Self.bytes(&random, SpecialFacility(isActive: 0, errorCntrl: 0, dataA: 0, dataB: (0, 0, 0, 0, 0)))
                                    facility.isActive = random.uniform(1...100) <= 85 ? 1 : 0
                                    try tables.3.insert(Self.sfKey(s, type), facility, in: tx)
                                    let starts = [0, 8, 16].shuffled(using: &random).prefix(random.uniform(0...3))
                                    for start in starts {
                                        let forwarding = CallForwarding(endTime: UInt8(start + random.uniform(1...8)), numberx: random.next() % 1_000_000_000_000_000)
                                        try tables.4.insert(Self.cfKey(s, type, start), forwarding, in: tx)
                                        rows += 1
                                    }
                                }
                            }
                            return rows
                        }
                    }
                    return cf
                }
            }
            return try await group.reduce(0, +)
        }
    }

    static func distinctTypes(_ random: inout WorkloadRandom, count: Int) -> [Int] {
        Array([1, 2, 3, 4].shuffled(using: &random).prefix(count))
    }

    package func runOne(on node: Node, transaction tx: Transaction, random: inout WorkloadRandom) throws -> TransactionOutcome {
        let roll = random.uniform(1...100)
        let type = Self.mix.firstIndex { roll <= $0 }!
        let s = nurand(&random)
        switch type {
        case 0:  // GET_SUBSCRIBER_DATA
            let row = try subscriber!.get(UInt64(s), in: tx)
            return TransactionOutcome(type: type, succeeded: row != nil)
        case 1:  // GET_NEW_DESTINATION
            let sfType = random.uniform(1...4)
            let startTime = [0, 8, 16][random.uniform(0...2)]
            let endTime = random.uniform(1...24)
            // The rows this transaction may read are known now: fetch them all at once.
            specialFacility!.prefetch(Self.sfKey(s, sfType), in: tx)
            for start in [0, 8, 16] where start <= startTime { callForwarding!.prefetch(Self.cfKey(s, sfType, start), in: tx) }
            guard let facility = try specialFacility!.get(Self.sfKey(s, sfType), in: tx), facility.isActive == 1 else {
                return TransactionOutcome(type: type, succeeded: false)
            }
            var found = false
            for start in [0, 8, 16] where start <= startTime {
                if let forwarding = try callForwarding!.get(Self.cfKey(s, sfType, start), in: tx), endTime < Int(forwarding.endTime) {
                    found = true
                }
            }
            return TransactionOutcome(type: type, succeeded: found)
        case 2:  // GET_ACCESS_DATA
            let row = try accessInfo!.get(Self.aiKey(s, random.uniform(1...4)), in: tx)
            return TransactionOutcome(type: type, succeeded: row != nil)
        case 3:  // UPDATE_SUBSCRIBER_DATA
            let bit = UInt16(random.uniform(0...1))
            let sfType = random.uniform(1...4)
            let dataA = UInt8(random.uniform(0...255))
            subscriber!.prefetch(UInt64(s), in: tx)
            specialFacility!.prefetch(Self.sfKey(s, sfType), in: tx)
            try subscriber!.update(UInt64(s), in: tx) { $0.bits = ($0.bits & ~1) | bit }
            let updated = try specialFacility!.update(Self.sfKey(s, sfType), in: tx) { $0.dataA = dataA }
            return TransactionOutcome(type: type, succeeded: updated)
        case 4:  // UPDATE_LOCATION (by sub_nbr)
            let location = UInt32(truncatingIfNeeded: random.next())
            guard let id = try subNbrIndex!.get(UInt64(s), in: tx) else { return TransactionOutcome(type: type, succeeded: false) }
            let updated = try subscriber!.update(id, in: tx) { $0.vlrLocation = location }
            return TransactionOutcome(type: type, succeeded: updated)
        case 5:  // INSERT_CALL_FORWARDING
            let sfType = random.uniform(1...4)
            let start = [0, 8, 16][random.uniform(0...2)]
            let end = UInt8(start + random.uniform(1...8))
            let number = random.next() % 1_000_000_000_000_000
            guard let id = try subNbrIndex!.get(UInt64(s), in: tx) else { return TransactionOutcome(type: type, succeeded: false) }
            guard try specialFacility!.get(Self.sfKey(Int(id), sfType), in: tx) != nil else {
                return TransactionOutcome(type: type, succeeded: false)
            }
            let inserted = try callForwarding!.insert(Self.cfKey(Int(id), sfType, start), CallForwarding(endTime: end, numberx: number), in: tx)
            return TransactionOutcome(type: type, delta: inserted ? 1 : 0, succeeded: inserted)
        default:  // DELETE_CALL_FORWARDING
            let sfType = random.uniform(1...4)
            let start = [0, 8, 16][random.uniform(0...2)]
            guard let id = try subNbrIndex!.get(UInt64(s), in: tx) else { return TransactionOutcome(type: type, succeeded: false) }
            let removed = try callForwarding!.remove(Self.cfKey(Int(id), sfType, start), in: tx)
            return TransactionOutcome(type: type, delta: removed ? -1 : 0, succeeded: removed)
        }
    }

    /// Row counts and referential consistency: every subscriber and its index entry exist; every
    /// subscriber has 1-4 Access_Info and 1-4 Special_Facility rows; every Call_Forwarding row has
    /// its Special_Facility row and a valid end time; Call_Forwarding holds the loaded rows plus the
    /// committed inserts minus the committed deletes, give or take some of those in doubt.
    package func check(_ cluster: Cluster, committedDelta: Int64, inDoubt: [Int64]) async throws -> [String] {
        let serving = cluster.servingNodes  // a crashed node answers nothing
        var problems: [String] = []
        var forwardingRows = 0
        let chunk = 250
        for first in stride(from: 1, through: subscribers, by: chunk) {
            let last = min(first + chunk - 1, subscribers)
            let tables = (subscriber!, subNbrIndex!, accessInfo!, specialFacility!, callForwarding!)
            let (found, bad) = try await serving[first % serving.count].transaction { tx -> (Int, [String]) in
                var rows = 0
                var bad: [String] = []
                for s in first...last {
                    if try tables.0.get(UInt64(s), in: tx)?.subNbr != UInt64(s) { bad.append("subscriber \(s) missing or wrong") }
                    if try tables.1.get(UInt64(s), in: tx) != UInt64(s) { bad.append("sub_nbr index of \(s) missing or wrong") }
                    let access = try (1...4).filter { try tables.2.get(Self.aiKey(s, $0), in: tx) != nil }.count
                    if !(1...4).contains(access) { bad.append("subscriber \(s) has \(access) Access_Info rows") }
                    var facilities = 0
                    for type in 1...4 {
                        let facility = try tables.3.get(Self.sfKey(s, type), in: tx)
                        if facility != nil { facilities += 1 }
                        for start in [0, 8, 16] {
                            guard let forwarding = try tables.4.get(Self.cfKey(s, type, start), in: tx) else { continue }
                            rows += 1
                            if facility == nil { bad.append("Call_Forwarding (\(s), \(type), \(start)) has no Special_Facility row") }
                            if !(start + 1...start + 8).contains(Int(forwarding.endTime)) {
                                bad.append("Call_Forwarding (\(s), \(type), \(start)) has end_time \(forwarding.endTime)")
                            }
                        }
                    }
                    if !(1...4).contains(facilities) { bad.append("subscriber \(s) has \(facilities) Special_Facility rows") }
                }
                return (rows, bad)
            }
            forwardingRows += found
            problems += bad.prefix(10)
            if problems.count > 20 { break }
        }
        let expected = loadedCallForwarding + Int(committedDelta)
        if problems.isEmpty && !InDoubt.explains(Int64(forwardingRows - expected), by: inDoubt) {
            problems.append("Call_Forwarding has \(forwardingRows) rows; loaded \(loadedCallForwarding) + committed inserts - deletes = \(expected)\(InDoubt.describe(inDoubt))")
        }
        return problems
    }
}
