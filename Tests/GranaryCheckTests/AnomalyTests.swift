import Foundation
import GranaryCheck
import Testing

/// Hand-written histories, one per anomaly class: each asserts the exact set of classes found
/// and the transactions named.
@Suite("Anomalies in hand-written histories")
struct AnomalyTests {
    @Test("G0: two transactions append to two keys in opposite orders")
    func g0() throws {
        var h = HistoryBuilder()
        let t1 = h.invoke(1, [append(1, 1), append(2, 3)])
        let t2 = h.invoke(2, [append(1, 2), append(2, 4)])
        h.ok(1)
        h.ok(2)
        h.txn(3, [read(1, [1, 2]), read(2, [4, 3])])
        let report = try h.check()
        #expect(report.kinds == [.g0])
        #expect(report.involved(.g0) == [t1, t2])
        let cycle = try #require(report.anomalies[.g0]?.first?.cycle)
        #expect(cycle.map(\.relation) == ["ww", "ww"])
        #expect(cycle[0].explanation == "T0 ww-> T1: T1 appended 2 after T0's 1 to key 1, per the read by T4")
        #expect(cycle[1].explanation == "T1 ww-> T0: T0 appended 3 after T1's 4 to key 2, per the read by T4")
        #expect(!report.isValid)
    }

    @Test("G1a: a read of an append whose transaction failed")
    func g1a() throws {
        var h = HistoryBuilder()
        let t1 = h.txn(1, [append(1, 1)], .fail)
        let t2 = h.txn(2, [read(1, [1])])
        let report = try h.check()
        #expect(report.kinds == [.g1a])
        #expect(report.involved(.g1a) == [t1, t2])
    }

    @Test("G1b: a read ending in a transaction's non-final append to the key")
    func g1b() throws {
        var h = HistoryBuilder()
        let t1 = h.invoke(1, [append(1, 1), append(1, 2)])
        let t2 = h.invoke(2, [read(1, [1])])
        h.ok(1)
        h.ok(2)
        let report = try h.check()
        #expect(report.kinds == [.g1b])
        #expect(report.involved(.g1b) == [t1, t2])
    }

    @Test("G1c: each of two transactions reads the other's append")
    func g1c() throws {
        var h = HistoryBuilder()
        let t1 = h.invoke(1, [append(1, 1), read(2, [2])])
        let t2 = h.invoke(2, [append(2, 2), read(1, [1])])
        h.ok(1)
        h.ok(2)
        let report = try h.check()
        #expect(report.kinds == [.g1c])
        #expect(report.involved(.g1c) == [t1, t2])
        #expect(report.anomalies[.g1c]?.first?.cycle.map(\.relation) == ["wr", "wr"])
    }

    @Test("G-single: read skew, one key seen after a transaction and the other before it")
    func gSingle() throws {
        var h = HistoryBuilder()
        let t1 = h.invoke(1, [append(1, 1), append(2, 2)])
        let t2 = h.invoke(2, [read(1, []), read(2, [2])])
        h.ok(1)
        h.ok(2)
        h.txn(3, [read(1, [1]), read(2, [2])])
        let report = try h.check()
        #expect(report.kinds == [.gSingle])
        #expect(report.involved(.gSingle) == [t1, t2])
        let cycle = try #require(report.anomalies[.gSingle]?.first?.cycle)
        #expect(Set(cycle.map(\.relation)) == ["wr", "rw"])
        #expect(cycle.contains { $0.explanation == "T1 rw-> T0: T1 read key 1 as empty, and T0 appended 1, its first element, per the read by T4" })
    }

    @Test("G2-item: write skew, each transaction misses the other's append")
    func g2Item() throws {
        var h = HistoryBuilder()
        let t1 = h.invoke(1, [read(1, []), append(2, 2)])
        let t2 = h.invoke(2, [read(2, []), append(1, 1)])
        h.ok(1)
        h.ok(2)
        h.txn(3, [read(1, [1]), read(2, [2])])
        let report = try h.check()
        #expect(report.kinds == [.g2Item])
        #expect(report.involved(.g2Item) == [t1, t2])
        #expect(report.anomalies[.g2Item]?.first?.cycle.map(\.relation) == ["rw", "rw"])
    }

    /// A stale read: T1 appends and completes; T2, invoked later, reads the key without T1's
    /// element; a later read shows the element. As Elle does, this is G-single-realtime (T2
    /// rw-> T1 realtime-> T2), not lost-append: the element was observed, so its place in the
    /// version order is known and the anti-dependency edge exists.
    @Test("G-single-realtime: a stale read of an element a later read shows")
    func staleRead() throws {
        var h = HistoryBuilder()
        let t1 = h.txn(1, [append(1, 1)])
        let t2 = h.txn(2, [read(1, [])])
        h.txn(3, [read(1, [1])])
        let report = try h.check()
        #expect(report.kinds == [.gSingleRealtime])
        #expect(report.involved(.gSingleRealtime) == [t1, t2])
        let cycle = try #require(report.anomalies[.gSingleRealtime]?.first?.cycle)
        #expect(cycle.map(\.relation) == ["realtime", "rw"])
        #expect(cycle[0].explanation.hasPrefix("T0 realtime-> T2: T0 completed (index 1, time 20) before T2 was invoked (index 2, time 30)"))
    }

    /// When no read ever shows the element, Elle cannot place it in the version order, so no
    /// edge (and no cycle) exists; the checker reports it as lost-append.
    @Test("lost-append: a committed append no read shows, though a read began after it completed")
    func lostAppend() throws {
        var h = HistoryBuilder()
        let t1 = h.txn(1, [append(1, 1)])
        let t2 = h.txn(2, [read(1, [])])
        let report = try h.check()
        #expect(report.kinds == [.lostAppend])
        #expect(report.involved(.lostAppend) == [t1, t2])
    }

    @Test("G0-realtime: appends in the opposite order of their real-time order")
    func g0Realtime() throws {
        var h = HistoryBuilder()
        let t1 = h.txn(1, [append(1, 1)])
        let t2 = h.txn(2, [append(1, 2)])
        h.txn(3, [read(1, [2, 1])])
        let report = try h.check()
        #expect(report.kinds == [.g0Realtime])
        #expect(report.involved(.g0Realtime) == [t1, t2])
    }

    @Test("internal: a read that misses the transaction's own earlier append")
    func internalInconsistency() throws {
        var h = HistoryBuilder()
        let t1 = h.txn(1, [append(1, 5), read(1, [])])
        let t2 = h.txn(2, [read(2, []), append(2, 6), read(2, [])])
        let report = try h.check()
        #expect(report.kinds == [.internalInconsistency])
        #expect(report.anomalyCounts[.internalInconsistency] == 2)
        #expect(Set(report.anomalies[.internalInconsistency]!.flatMap(\.indices)) == [t1, t2])
    }

    @Test("duplicate-elements: an element twice in one read")
    func duplicateElements() throws {
        var h = HistoryBuilder()
        h.txn(1, [append(1, 1)])
        h.txn(2, [append(1, 2)])
        let t3 = h.txn(3, [read(1, [1, 2, 1])])
        let report = try h.check()
        #expect(report.kinds == [.duplicateElements])
        #expect(report.involved(.duplicateElements) == [t3])
    }

    @Test("incompatible-order: two reads of a key, neither a prefix of the other")
    func incompatibleOrder() throws {
        var h = HistoryBuilder()
        h.invoke(1, [append(1, 1)])
        h.invoke(2, [append(1, 2)])
        h.ok(1)
        h.ok(2)
        let t3 = h.txn(3, [read(1, [1, 2])])
        let t4 = h.txn(4, [read(1, [2, 1])])
        let report = try h.check()
        #expect(report.kinds == [.incompatibleOrder])
        #expect(report.involved(.incompatibleOrder) == [t3, t4])
        #expect(report.anomalies[.incompatibleOrder]?.first?.key == 1)
        #expect(report.anomalies[.incompatibleOrder]?.first?.explanation
                == "key 1: T6 read [2, 1] and T4 read [1, 2]; neither is a prefix of the other: at position 1, T6 has 2 and T4 1")
    }

    @Test("garbage-read: a read of an element nobody appended")
    func garbageRead() throws {
        var h = HistoryBuilder()
        h.txn(1, [append(1, 1)])
        let t2 = h.txn(2, [read(1, [1, 99])])
        let report = try h.check()
        #expect(report.kinds == [.garbageRead])
        #expect(report.involved(.garbageRead) == [t2])
    }

    @Test("rw-register G-single: read skew over two registers")
    func registerGSingle() throws {
        var h = HistoryBuilder()
        h.txn(1, [write(1, 1), write(2, 1)])
        let t1 = h.invoke(1, [readRegister(1, 1), write(1, 2), readRegister(2, 1), write(2, 2)])
        let t2 = h.invoke(2, [readRegister(1, 1), readRegister(2, 2)])
        h.ok(1)
        h.ok(2)
        let report = try h.check()
        #expect(report.kinds == [.gSingle])
        #expect(report.involved(.gSingle) == [t1, t2])
        let cycle = try #require(report.anomalies[.gSingle]?.first?.cycle)
        #expect(cycle.map(\.explanation) == [
            "T2 wr-> T3: T3 read key 2 = 2, which T2 wrote",
            "T3 rw-> T2: T3 read key 1 = 1, and T2 read that version too and overwrote it with 2",
        ])
    }

    @Test("rw-register G1c: each of two transactions reads the other's write")
    func registerG1c() throws {
        var h = HistoryBuilder()
        let t1 = h.invoke(1, [write(1, 1), readRegister(2, 2)])
        let t2 = h.invoke(2, [write(2, 2), readRegister(1, 1)])
        h.ok(1)
        h.ok(2)
        let report = try h.check()
        #expect(report.kinds == [.g1c])
        #expect(report.involved(.g1c) == [t1, t2])
    }

    @Test("rw-register lost-update: two transactions read the initial value and both write it (also G2-item)")
    func registerLostUpdate() throws {
        var h = HistoryBuilder()
        let t1 = h.invoke(1, [readRegister(1, nil), write(1, 1)])
        let t2 = h.invoke(2, [readRegister(1, nil), write(1, 2)])
        h.ok(1)
        h.ok(2)
        let report = try h.check()
        #expect(report.kinds == [.lostUpdate, .g2Item])
        #expect(report.involved(.lostUpdate) == [t1, t2])
        #expect(report.involved(.g2Item) == [t1, t2])
    }

    @Test("rw-register G1a and garbage-read")
    func registerG1aAndGarbage() throws {
        var h = HistoryBuilder()
        let t1 = h.txn(1, [write(1, 5)], .fail)
        let t2 = h.txn(2, [readRegister(1, 5)])
        let t3 = h.txn(3, [readRegister(2, 7)])
        let report = try h.check()
        #expect(report.kinds == [.g1a, .garbageRead])
        #expect(report.involved(.g1a) == [t1, t2])
        #expect(report.involved(.garbageRead) == [t3])
    }

    @Test("the report: description and JSON name the class, the transactions and the edges")
    func reportForms() throws {
        var h = HistoryBuilder()
        h.txn(1, [append(1, 1)])
        h.txn(2, [read(1, [])])
        h.txn(3, [read(1, [1])])
        let report = try h.check()
        #expect(report.description.contains("INVALID: 1 anomaly: G-single-realtime 1"))
        #expect(report.description.contains("T2 rw-> T0: T2 read key 1 as empty, and T0 appended 1, its first element, per the read by T4"))
        let object = try #require(try JSONSerialization.jsonObject(with: Data(report.json().utf8)) as? [String: Any])
        #expect(object["isValid"] as? Bool == false)
        #expect((object["anomalyCounts"] as? [String: Int])?["G-single-realtime"] == 1)
        let decoded = try JSONDecoder().decode(CheckReport.self, from: Data(report.json().utf8))
        #expect(decoded.anomalies == report.anomalies)
    }

    @Test("a cycle search out of budget says so, and a plain search still reports the cycle")
    func searchBudget() throws {
        var h = HistoryBuilder()
        h.invoke(1, [append(1, 1), append(2, 2)])
        h.invoke(2, [read(1, []), read(2, [2])])
        h.ok(1)
        h.ok(2)
        h.txn(3, [read(1, [1]), read(2, [2])])
        let report = check(history: try h.history(), options: CheckOptions(searchBudget: 1))
        #expect(report.incompleteSearches.contains(.gSingle))
        #expect(report.kinds == [.gSingle])
        #expect(!report.isValid)
        #expect(report.description.contains("note: the cycle search ran out of budget for"))
    }

    @Test("examples are bounded, counts are not")
    func boundedExamples() throws {
        var h = HistoryBuilder()
        for key in 0..<10 { h.txn(1, [read(key, [99])]) }
        let report = try h.check(maxExamples: 3)
        #expect(report.anomalyCounts[.garbageRead] == 10)
        #expect(report.anomalies[.garbageRead]?.count == 3)
    }
}

/// Histories with no anomaly.
@Suite("Valid histories")
struct ValidHistoryTests {
    @Test("a serial list-append history")
    func serial() throws {
        var h = HistoryBuilder()
        h.txn(1, [append(1, 1), read(1, [1])])
        h.txn(2, [read(1, [1]), append(1, 2), append(2, 3)])
        h.txn(1, [read(1, [1, 2]), read(2, [3])])
        h.txn(3, [read(3, [])])
        h.txn(2, [append(3, 4), read(3, [4]), read(2, [3])])
        let report = try h.check()
        #expect(report.isValid, "\(report)")
        #expect(report.okCount == 5)
    }

    @Test("concurrent but serializable, with fail, info and nemesis events")
    func concurrent() throws {
        var h = HistoryBuilder()
        h.invoke(1, [read(1, [2]), append(1, 1)])
        h.invoke(2, [append(1, 2)])
        h.ok(2)
        h.nemesis("crash", .int(2))
        h.ok(1)
        h.txn(3, [append(1, 9)], .fail)
        h.invoke(4, [append(1, 10)])
        h.info(4)
        // The same process continues after an info (tolerated); this one is never observed.
        h.invoke(4, [append(2, 11)])
        h.info(4)
        h.nemesis("restart", .int(2))
        h.txn(5, [read(1, [2, 1, 10]), read(2, [])])
        let report = try h.check()
        #expect(report.isValid, "\(report)")
        #expect(report.okCount == 3)
        #expect(report.failCount == 1)
        #expect(report.infoCount == 2)
        #expect(report.observedInfoCount == 1)
        #expect(report.nemesisCount == 2)
        #expect(report.nemesisEvents.map(\.f) == ["crash", "restart"])
    }

    @Test("a transaction still pending at the end counts as info")
    func pendingAtEnd() throws {
        var h = HistoryBuilder()
        h.txn(1, [append(1, 1)])
        h.invoke(2, [append(1, 2)])
        h.txn(3, [read(1, [1, 2])])
        let report = try h.check()
        #expect(report.isValid, "\(report)")
        #expect(report.infoCount == 1)
        #expect(report.observedInfoCount == 1)
    }

    @Test("a concurrent rw-register history")
    func registers() throws {
        var h = HistoryBuilder()
        h.txn(1, [write(1, 1)])
        h.invoke(2, [readRegister(1, 1), write(1, 2)])
        h.invoke(3, [readRegister(1, 1)])
        h.ok(3)
        h.ok(2)
        h.txn(1, [readRegister(1, 2), readRegister(2, nil), write(2, 5), readRegister(2, 5)])
        let report = try h.check()
        #expect(report.isValid, "\(report)")
        #expect(report.registerKeyCount == 2)
    }

    @Test("generated histories with fail, info and nemesis events", arguments: [1, 2, 3] as [UInt64])
    func generated(seed: UInt64) throws {
        let operations = HistoryGenerator(.init(transactions: 3_000, processes: 8, keys: 20, failFraction: 0.05,
                                                infoFraction: 0.05, nemesisEvents: 6, seed: seed)).listAppend()
        let report = check(history: try History(operations: operations))
        #expect(report.isValid, "\(report)")
        #expect(report.okCount + report.failCount + report.infoCount == 3_000)
        #expect(report.failCount > 0 && report.infoCount > 0 && report.nemesisCount == 6)
    }
}
